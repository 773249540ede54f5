"""Writing an export's ONNX file: the graph exported with the fixed input name, a dynamic batch axis
named ``batch`` and inline weights (:func:`write_onnx`), its operators (:func:`onnx_ops`), the
temporary file an export writes first (:func:`onnx_out`), and what both exports return.
"""

from __future__ import annotations

import os
import platform
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devrecd import __version__
from devrecd.contract import BATCH_AXIS, INPUT_NAME, OUTPUT_NAME, Contract, EmbedderContract
from devrecd.errors import ArtifactError
from devrecd.features import FEATURE_DIM, N_FRAMES

DEFAULT_OPSET = 18  # TensorRT 10.0 parses opsets 9..20; 18 is the dynamo exporter's native opset
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"  # measured faster and equally exact for this graph: docs/backends.md


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    contract_path: Path
    contract: Contract | EmbedderContract
    seconds: float
    # Where each end of a classifier's validated_snr_db comes from, in words (train_data.snr_range_origin;
    # "": not recorded, or an embedder's export)
    snr_origin: str = ""


def fp16_path_for(onnx_path: str | os.PathLike) -> Path:
    """``export/NAME.onnx`` -> ``export/NAME-fp16.onnx`` (the FP16 variant written by ``--fp16``)."""
    p = Path(onnx_path)
    return p.with_name(f"{p.stem}-fp16{p.suffix}")


def onnx_out(out: str | os.PathLike) -> tuple[Path, Path]:
    """An export's ``NAME.onnx`` and the temporary file it is written to first (an export never leaves
    a half-written or unchecked NAME.onnx behind)."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise ArtifactError(f"--out must end in .onnx, not {out.name!r}", reason="export")
    return out, out.with_name(f".{out.name}.partial")


def write_onnx(graph: Any, out: Path, *, opset: int = DEFAULT_OPSET, exporter: str = DEFAULT_EXPORTER,
               output_name: str = OUTPUT_NAME) -> None:
    """Export ``graph`` with the fixed input name, ``output_name`` (the classifier's ``probs`` or an
    embedder's ``embedding``), a dynamic batch axis and inline weights."""
    import torch

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


def software_versions() -> dict[str, str]:
    """Versions that shape the exported graph (recorded in the contract)."""
    import onnx
    import onnxruntime

    import torch

    return {"devrecd": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
