"""``devrecd export``: a checkpoint -> ``export/NAME.onnx`` + its contract ``export/NAME.json``.

The exported graph is the whole serving network::

    features (B, 128, 73) float32, raw   --(x - mean) / std in FP32-->  network  --softmax (FP32)-->  probs (B, N)

Normalisation and softmax are folded into the graph (a tiny wrapper module, as wespeaker's
``export_onnx.py`` does), so a backend needs nothing but the contract to serve it. The batch axis is
dynamic; the weights are stored inline (the model is ~2.5 MB; TensorRT's parser then needs no
side file). An FP16 variant (``NAME-fp16.onnx``) keeps the input and the normalisation in FP32 and
casts after it: the 34 pre-Fbank dims reach ~1e6 and overflow FP16 before normalisation
(``../shared/design/gpu-notes.md``); the softmax is done in FP32 again. TensorRT 11 builds strongly
typed networks only, so precision has to live in the graph's tensor types, not in a builder flag.

A parity check is part of every export: the same real features through torch and through ONNX
Runtime, max abs difference of the probabilities and top-1 agreement reported; above the tolerance
the export fails and the ONNX file is removed.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from devrecd import __version__
from devrecd.config import Config
from devrecd.contract import (BATCH_AXIS, INPUT_NAME, OUTPUT_NAME, Contract, contract_path_for, input_spec,
                              output_spec)
from devrecd.errors import ArtifactError, DevrecdError
from devrecd.features import FEATURE_DIM, N_FRAMES, FrontendConfig

log = logging.getLogger("devrecd.export")

DEFAULT_OPSET = 18  # TensorRT 10.0 parses opsets 9..20; 18 is the dynamo exporter's native opset
# Max abs difference of probabilities between torch and ONNX Runtime. FP32 graphs agree to ~1e-6
# (reordered float sums); FP16 arithmetic has ~1e-3 relative error through 384 recurrent steps.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"  # measured faster and equally exact for this graph: docs/backends.md
PARITY_CLIPS = 48  # real windows used by the parity check (spread over the given recordings)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac", ".amr", ".3gp", ".opus")


def _torch():
    import torch

    return torch


def inference_graph(network: Any, norm_mean: np.ndarray, norm_std: np.ndarray, *, precision: str = "fp32") -> Any:
    """The serving graph: raw features -> FP32 normalisation -> network (fp32|fp16) -> FP32 softmax.

    ``network`` maps NORMALISED (B, 128, 73) features to logits (the model interface). Used by the
    export and by the torch backend, so that both run exactly the same computation.
    """
    torch = _torch()

    class InferenceGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            mean = np.asarray(norm_mean, dtype=np.float32).reshape(FEATURE_DIM)
            std = np.asarray(norm_std, dtype=np.float32).reshape(FEATURE_DIM)
            if not np.all(np.isfinite(mean)) or not np.all(np.isfinite(std)) or np.any(std <= 0):
                raise ArtifactError("normalisation statistics must be finite with std > 0", reason="checkpoint_invalid")
            self.register_buffer("mean", torch.from_numpy(mean.copy()))
            self.register_buffer("inv_std", torch.from_numpy((1.0 / std).astype(np.float32)))
            self.half_precision = precision == "fp16"
            self.network = network.half() if self.half_precision else network.float()

        def forward(self, features):
            x = (features - self.mean) * self.inv_std  # FP32: raw pre-Fbank energies overflow FP16
            if self.half_precision:
                x = x.half()
            logits = self.network(x)
            return torch.softmax(logits.float(), dim=-1)

    if precision not in TOLERANCE:
        raise ArtifactError(f"precision must be one of {', '.join(TOLERANCE)}, not {precision!r}", reason="export")
    return InferenceGraph().eval()


def graph_for_checkpoint(ckpt: Any, *, precision: str = "fp32") -> Any:
    """:func:`inference_graph` of a loaded :class:`~devrecd.model.checkpoint.Checkpoint`."""
    return inference_graph(ckpt.build(), ckpt.norm_mean, ckpt.norm_std, precision=precision)


def fp16_path_for(onnx_path: str | os.PathLike) -> Path:
    """``export/NAME.onnx`` -> ``export/NAME-fp16.onnx`` (the FP16 variant written by ``--fp16``)."""
    p = Path(onnx_path)
    return p.with_name(f"{p.stem}-fp16{p.suffix}")


# --- the ONNX file --------------------------------------------------------------------------

def write_onnx(graph: Any, out: Path, *, opset: int = DEFAULT_OPSET, exporter: str = DEFAULT_EXPORTER) -> None:
    """Export ``graph`` with the fixed I/O names, a dynamic batch axis and inline weights."""
    torch = _torch()
    if exporter not in EXPORTERS:
        raise ArtifactError(f"exporter must be one of {', '.join(EXPORTERS)}", reason="export")
    example = torch.zeros(2, N_FRAMES, FEATURE_DIM)  # batch 2: torch.export would specialise a batch of 1
    out.parent.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                                  external_data=False)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python-level shape check in nn.LSTM/MultiheadAttention, and
        # about LSTM + batch != 1; the dynamic batch is verified instead (tests: batch 1, 3, 64).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*LSTM", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        if exporter == "dynamo":
            batch = torch.export.Dim(BATCH_AXIS, min=1, max=65536)
            torch.onnx.export(graph, (example,), str(out), dynamo=True, dynamic_shapes={"features": {0: batch}},
                              **common)
        else:
            torch.onnx.export(graph, (example,), str(out), dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}}, **common)
    _normalise_io(out)


def _normalise_io(path: Path) -> None:
    """Name the batch axis ``batch`` on input and output; refuse external weight files."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ArtifactError(f"{path}: weights were written to an external file; devrecd stores them inline",
                                reason="export")
    for value in (*model.graph.input, *model.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_value")
        dim0.dim_param = BATCH_AXIS
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def onnx_ops(path: str | os.PathLike) -> Counter:
    """Operator types of a graph (subgraphs included) and how often each occurs."""
    import onnx

    counts: Counter = Counter()

    def walk(graph: Any) -> None:
        for node in graph.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(onnx.load(str(path), load_external_data=False).graph)
    return counts


# --- parity --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Parity:
    """torch vs ONNX Runtime on the same features."""

    n_clips: int
    max_abs_diff: float
    top1_agreement: float  # fraction of clips with the same argmax
    tolerance: float
    source: str  # what the features came from

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"n_clips": self.n_clips, "max_abs_diff": self.max_abs_diff, "top1_agreement": self.top1_agreement,
                "tolerance": self.tolerance, "source": self.source, "passed": self.passed}


def audio_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files given directly, plus the audio files found (sorted) under given folders."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise ArtifactError(f"parity audio not found: {p}", reason="parity_audio")
    return out


def parity_features(files: Sequence[Path], frontend: FrontendConfig, cfg: Config, *,
                    max_clips: int = PARITY_CLIPS) -> np.ndarray:
    """Up to ``max_clips`` real feature windows, spread evenly over ``files`` (model's frontend)."""
    from devrecd.pipeline import features_for_file

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
            continue
        idx = np.linspace(0, len(feats) - 1, num=min(per_file, len(feats))).round().astype(int)
        chunks.append(feats[np.unique(idx)])
    if not chunks:
        raise ArtifactError("none of the parity recordings could be decoded", reason="parity_audio")
    return np.concatenate(chunks)[:max_clips]


def ort_session(onnx_path: str | os.PathLike, *, threads: int = 1, precision: str = "fp32") -> Any:
    """An ONNX Runtime CPU session with explicit options (the one place sessions are made)."""
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
    # ORT 1.32 crashes (SIGSEGV) while applying its layout optimisations (ORT_ENABLE_ALL) to the FP16
    # graph; the extended level is safe and FP16 is only a CPU fallback (it is meant for TensorRT).
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if precision == "fp16"
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    opts.log_severity_level = 3  # errors only: ORT's warnings go to stderr, bypassing our logging
    # No memory pattern: with it ORT plans one block for all of a run's intermediates per input
    # shape and keeps it in the arena, which costs far more than the tensors alive at once
    # (measured, paper network, one thread: peak 530 -> 332 MB at batch 32, 152 -> 127 MB at
    # batch 4, no measurable change in time per window). The arena itself is kept: disabling it
    # did not lower the peak and made runs slower.
    opts.enable_mem_pattern = False
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
        raise ArtifactError(f"ONNX Runtime cannot load {onnx_path}: {exc}", reason="onnx_invalid") from None


def check_parity(reference: Any, onnx_path: Path, features: np.ndarray, *, tolerance: float, source: str,
                 threads: int = 1, precision: str = "fp32") -> Parity:
    """Run ``features`` through the torch ``reference`` graph and the ONNX file; compare probabilities.

    For an FP16 export the reference is the FP32 graph: what matters is the error against the model.
    """
    torch = _torch()
    with torch.no_grad():
        expected = reference(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).numpy()
    session = ort_session(onnx_path, threads=threads, precision=precision)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: features.astype(np.float32)})[0]
    if got.shape != expected.shape:
        raise ArtifactError(f"parity: ONNX output shape {got.shape} != torch {expected.shape}", reason="parity")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    agree = float(np.mean(got.argmax(-1) == expected.argmax(-1)))
    return Parity(len(features), diff, agree, tolerance, source)


def parity_features_path(onnx_path: str | os.PathLike) -> Path:
    """``export/NAME.onnx`` -> ``export/NAME.parity.npy`` (the real features parity was checked on)."""
    p = Path(onnx_path)
    return p.with_name(f"{p.stem}.parity.npy")


def load_parity_features(onnx_path: str | os.PathLike, contract: Contract) -> tuple[np.ndarray, str]:
    """The export's parity features (sha256-checked against the contract) and where they came from."""
    from devrecd.audio import sha256_file

    path = parity_features_path(onnx_path)
    want = contract.parity.get("features_sha256")
    if not path.is_file() or not want or sha256_file(path) != want:
        raise ArtifactError(f"parity features {path} are missing or not the ones in the contract: re-export the "
                            "model (they are written beside NAME.onnx)", reason="parity_features")
    return np.load(path), str(contract.parity.get("source", path.name))


# --- the export command ---------------------------------------------------------------------

@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    contract_path: Path
    contract: Contract
    seconds: float


def software_versions() -> dict[str, str]:
    """Versions that shape the exported graph (recorded in the contract)."""
    import onnx
    import onnxruntime

    torch = _torch()
    return {"devrecd": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def export_graph(graph: Any, out: str | os.PathLike, *, labels: Sequence[str], frontend: FrontendConfig,
                 features: np.ndarray, feature_source: str, arch: str, checkpoint_sha256: str,
                 dataset_sha256: str = "", precision: str = "fp32", opset: int = DEFAULT_OPSET,
                 exporter: str = DEFAULT_EXPORTER, tolerance: float | None = None, threads: int = 1,
                 reference: Any = None) -> ExportResult:
    """Export a built inference graph, check parity on ``features``, write the contract.

    ``reference`` is the torch graph the ONNX output is compared with (default: ``graph`` itself).
    """
    from devrecd.audio import sha256_file

    out = Path(out)
    if out.suffix != ".onnx":
        raise ArtifactError(f"--out must end in .onnx, not {out.name!r}", reason="export")
    tolerance = TOLERANCE[precision] if tolerance is None else tolerance
    t0 = time.perf_counter()
    tmp = out.with_name(f".{out.name}.partial")  # never leave a half-written NAME.onnx behind
    try:
        write_onnx(graph, tmp, opset=opset, exporter=exporter)
        seconds = time.perf_counter() - t0
        parity = check_parity(graph if reference is None else reference, tmp, features, tolerance=tolerance,
                              source=feature_source, threads=threads, precision=precision)
        log.info("parity", extra=parity.to_dict() | {"precision": precision})
        if not parity.passed:
            raise ArtifactError(
                f"parity check failed for {out.name}: torch vs ONNX Runtime max abs difference "
                f"{parity.max_abs_diff:.3g} > tolerance {tolerance:g} on {parity.n_clips} clips "
                f"(top-1 agreement {parity.top1_agreement:.1%}); the ONNX file was not written", reason="parity")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    # Keep the parity features: build-engine compares the engine with ONNX Runtime on the same real inputs.
    feats_path = parity_features_path(out)
    np.save(feats_path, np.ascontiguousarray(features, dtype=np.float32))
    contract = Contract(
        name=out.stem, onnx_file=out.name, onnx_sha256=sha256_file(out), onnx_bytes=out.stat().st_size,
        input=input_spec(), output=output_spec(len(labels)), labels=tuple(labels), frontend=frontend,
        frontend_fingerprint=frontend.fingerprint(), precision=precision, opset=opset, arch=arch,
        checkpoint_sha256=checkpoint_sha256, dataset_sha256=dataset_sha256,
        parity=parity.to_dict() | {"exporter": exporter, "export_seconds": round(seconds, 1),
                                   "features_file": feats_path.name, "features_sha256": sha256_file(feats_path)},
        versions=software_versions(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    contract_path = contract.save(contract_path_for(out))
    return ExportResult(out, contract_path, contract, seconds)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, cfg: Config,
                      parity_audio: Sequence[str | os.PathLike], fp16: bool = False, opset: int = DEFAULT_OPSET,
                      exporter: str = DEFAULT_EXPORTER, tolerance: float | None = None,
                      max_parity_clips: int = PARITY_CLIPS) -> list[ExportResult]:
    """``devrecd export``: the FP32 model (and with ``fp16`` its FP16 variant), parity-checked.

    ``checkpoint`` is a run folder or a ``.pt`` file (:func:`~devrecd.model.checkpoint.load_checkpoint`).
    Parity features come from ``parity_audio`` (files or folders of real recordings).
    """
    from devrecd.audio import sha256_file
    from devrecd.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    ckpt_file = Path(checkpoint)
    ckpt_file = ckpt_file / "best.pt" if ckpt_file.is_dir() else ckpt_file
    files = audio_files(parity_audio)
    feats = parity_features(files, ckpt.frontend, cfg, max_clips=max_parity_clips)
    source = f"{len(feats)} windows of {len(files)} recording(s) under {_common_root(files)}"
    common = dict(labels=list(ckpt.labels), frontend=ckpt.frontend, features=feats, feature_source=source,
                  arch=ckpt.arch, checkpoint_sha256=sha256_file(ckpt_file), dataset_sha256=ckpt.dataset_sha256,
                  opset=opset, exporter=exporter, threads=cfg.backend.threads)
    fp32_graph = graph_for_checkpoint(ckpt)
    results = [export_graph(fp32_graph, out, tolerance=tolerance, **common)]
    if fp16:
        results.append(export_graph(graph_for_checkpoint(ckpt, precision="fp16"), fp16_path_for(out),
                                    precision="fp16", tolerance=None, reference=fp32_graph, **common))
    return results


def _common_root(files: Sequence[Path]) -> str:
    try:
        return os.path.commonpath([str(f.resolve().parent) for f in files])
    except ValueError:
        return "several folders"
