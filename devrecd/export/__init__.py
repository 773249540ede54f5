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

The package, a module a job: ``onnx_file`` (writing the ONNX file), ``parity`` (the parity checks and
their features), ``ort_format`` (``NAME.ort``), ``classifier`` (``devrecd export``) and ``embedder``
(``devrecd export-embedder``). Their public names are importable from here.
"""

from devrecd.export.classifier import export_checkpoint, export_graph
from devrecd.export.embedder import export_embedder, export_embedding_graph
from devrecd.export.onnx_file import (DEFAULT_EXPORTER, DEFAULT_OPSET, EXPORTERS, ExportResult, fp16_path_for, onnx_ops,
                                      software_versions, write_onnx)
from devrecd.export.ort_format import check_ort, ort_path_for
from devrecd.export.parity import (EMBEDDING_TOLERANCE, PARITY_CLIPS, TOLERANCE, Parity, audio_files, check_parity,
                                   embedding_parity, load_parity_features, parity_features, parity_features_path)

__all__ = ["DEFAULT_EXPORTER", "DEFAULT_OPSET", "EMBEDDING_TOLERANCE", "EXPORTERS", "PARITY_CLIPS", "TOLERANCE",
           "ExportResult", "Parity", "audio_files", "check_ort", "check_parity", "embedding_parity",
           "export_checkpoint", "export_embedder", "export_embedding_graph", "export_graph", "fp16_path_for",
           "load_parity_features", "onnx_ops", "ort_path_for", "parity_features", "parity_features_path",
           "software_versions", "write_onnx"]
