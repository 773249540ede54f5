"""``devrecd export``: a checkpoint -> ``export/NAME.onnx`` + its contract ``export/NAME.json``.

The exported graph is the whole serving network (:mod:`devrecd.model.serving`)::

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

Beside ``NAME.onnx`` the export writes ``NAME.ort``: the graph after ONNX Runtime's (basic)
optimisations, saved in ORT's own format, so that a serving session skips re-optimising ~9000 nodes
(session start ~0.3 s CPU instead of ~1 s; docs/backends.md). Its outputs are checked against the
``.onnx``'s on the same parity features, and it is recorded in the contract (name, sha256, size, the
onnxruntime version that wrote it).

``devrecd export-embedder`` (:func:`export_embedder`) exports an open-set embedder the same way:
raw features -> normalisation -> ``embed`` -> ``embedding`` (B, D), its embeddings checked against the
torch embedder's on real windows (relative to their norm), an embedder contract beside it
(:class:`~devrecd.contract.EmbedderContract`, carrying the torch embedder's fingerprint).
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
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from devrecd import __version__
from devrecd.backends.onnxrt import ort_session
from devrecd.config import Config
from devrecd.contract import (BATCH_AXIS, EMBEDDING_NAME, INPUT_NAME, OUTPUT_NAME, Contract, EmbedderContract,
                              contract_path_for, embedding_spec, input_spec, output_spec)
from devrecd.errors import ArtifactError, DevrecdError
from devrecd.features import FEATURE_DIM, N_FRAMES, FrontendConfig
from devrecd.fsutil import move_into_place, sha256_artifact

log = logging.getLogger("devrecd.export")

DEFAULT_OPSET = 18  # TensorRT 10.0 parses opsets 9..20; 18 is the dynamo exporter's native opset
# Max abs difference of probabilities between torch and ONNX Runtime. FP32 graphs agree to ~1e-6
# (reordered float sums); FP16 arithmetic has ~1e-3 relative error through 384 recurrent steps.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
# Embedder exports: max abs difference of an embedding from torch's, relative to the torch embedding's
# norm (embeddings are not unit length; the scorers compare directions). FP32 agrees to ~1e-6.
EMBEDDING_TOLERANCE = 1e-4
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"  # measured faster and equally exact for this graph: docs/backends.md
PARITY_CLIPS = 48  # real windows used by the parity check (spread over the given recordings)


def _torch():
    import torch

    return torch


def fp16_path_for(onnx_path: str | os.PathLike) -> Path:
    """``export/NAME.onnx`` -> ``export/NAME-fp16.onnx`` (the FP16 variant written by ``--fp16``)."""
    p = Path(onnx_path)
    return p.with_name(f"{p.stem}-fp16{p.suffix}")


# --- the ONNX file --------------------------------------------------------------------------

def write_onnx(graph: Any, out: Path, *, opset: int = DEFAULT_OPSET, exporter: str = DEFAULT_EXPORTER,
               output_name: str = OUTPUT_NAME) -> None:
    """Export ``graph`` with the fixed input name, ``output_name`` (the classifier's ``probs`` or an
    embedder's ``embedding``), a dynamic batch axis and inline weights."""
    torch = _torch()
    if exporter not in EXPORTERS:
        raise ArtifactError(f"exporter must be one of {', '.join(EXPORTERS)}", reason="export")
    example = torch.zeros(2, N_FRAMES, FEATURE_DIM)  # batch 2: torch.export would specialise a batch of 1
    out.parent.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=[output_name], opset_version=opset,
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
                              dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, output_name: {0: BATCH_AXIS}}, **common)
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
    from devrecd.pipeline.stages import features_for_file

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
    torch = _torch()
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


# --- the export command ---------------------------------------------------------------------

@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    contract_path: Path
    contract: Contract | EmbedderContract
    seconds: float


def software_versions() -> dict[str, str]:
    """Versions that shape the exported graph (recorded in the contract)."""
    import onnx
    import onnxruntime

    torch = _torch()
    return {"devrecd": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _onnx_out(out: str | os.PathLike) -> tuple[Path, Path]:
    """An export's ``NAME.onnx`` and the temporary file it is written to first (an export never leaves
    a half-written or unchecked NAME.onnx behind)."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise ArtifactError(f"--out must end in .onnx, not {out.name!r}", reason="export")
    return out, out.with_name(f".{out.name}.partial")


def export_graph(graph: Any, out: str | os.PathLike, *, labels: Sequence[str], frontend: FrontendConfig,
                 features: np.ndarray, feature_source: str, arch: str, checkpoint_sha256: str,
                 dataset_sha256: str = "", precision: str = "fp32", opset: int = DEFAULT_OPSET,
                 exporter: str = DEFAULT_EXPORTER, tolerance: float | None = None, threads: int = 1,
                 reference: Any = None) -> ExportResult:
    """Export a built inference graph, check parity on ``features``, write the contract.

    ``reference`` is the torch graph the ONNX output is compared with (default: ``graph`` itself).
    """
    out, tmp = _onnx_out(out)
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

    ckpt = load_checkpoint(checkpoint)
    outs = [Path(out)] + ([fp16_path_for(out)] if fp16 else [])
    feats, source, step = _parity_input(parity_audio, ckpt.frontend, cfg, max_parity_clips, len(outs), on_progress)
    common = dict(labels=list(ckpt.labels), frontend=ckpt.frontend, features=feats, feature_source=source,
                  arch=ckpt.arch, checkpoint_sha256=sha256_artifact(resolve_checkpoint_path(checkpoint)),
                  dataset_sha256=ckpt.dataset_sha256,
                  opset=opset, exporter=exporter, threads=cfg.backend.threads)
    fp32_graph = graph_for_checkpoint(ckpt)
    results = [export_graph(fp32_graph, out, tolerance=tolerance, **common)]
    step(f"exported {outs[0].name}")
    if fp16:
        results.append(export_graph(graph_for_checkpoint(ckpt, precision="fp16"), outs[1],
                                    precision="fp16", tolerance=None, reference=fp32_graph, **common))
        step(f"exported {outs[1].name}")
    return results


def _common_root(files: Sequence[Path]) -> str:
    try:
        return os.path.commonpath([str(f.resolve().parent) for f in files])
    except ValueError:
        return "several folders"


def _parity_input(parity_audio: Sequence[str | os.PathLike], frontend: FrontendConfig, cfg: Config, max_clips: int,
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


# --- embedder exports ------------------------------------------------------------------------

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

    out, tmp = _onnx_out(out)
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
    feats, source, step = _parity_input(parity_audio, ckpt.frontend, cfg, max_parity_clips, 1, on_progress)
    result = export_embedding_graph(embedder, out, features=feats, feature_source=source,
                                    checkpoint_sha256=sha256_artifact(resolve_checkpoint_path(checkpoint)), opset=opset,
                                    exporter=exporter, threads=cfg.backend.threads,
                                    tolerance=EMBEDDING_TOLERANCE if tolerance is None else tolerance)
    step(f"exported {result.onnx_path.name}")
    return result
