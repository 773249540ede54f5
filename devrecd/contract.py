"""The model contract: what an exported network expects and promises, written beside ``NAME.onnx``.

``devrecd export`` writes ``export/NAME.json`` next to ``export/NAME.onnx``. Every consumer (the ONNX
Runtime and TensorRT backends, ``devrecd build-engine``, the daemon) loads the contract first and
refuses an artifact that does not match it: a different ONNX file (sha256), a truncated one (size), a
frontend or label list other than the configuration's. ``ort`` (optional: exports before it have
none) names ``NAME.ort``, ONNX Runtime's own format of the optimised graph, which starts faster; it is
held to the same rules (size, sha256) and records the onnxruntime version that wrote it and its parity
with the ``.onnx``. The contract is plain JSON so that an
examiner can read what a verdict's model was without running anything.

``devrecd export-embedder`` writes a second kind, :class:`EmbedderContract` (``"kind": "embedder"``):
a network that maps the same raw features to device embeddings for the open set, identified by the
torch embedder's fingerprint (what registries record). The two kinds are never interchangeable: each
loader refuses the other kind with ``reason="contract_kind"``.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from devrecd.errors import ArtifactError, ConfigError
from devrecd.features import FEATURE_DIM, N_FRAMES, FrontendConfig
from devrecd.fsutil import atomic_write, sha256_artifact
from devrecd.validation import read_snr_range, snr_range_problem

SCHEMA = "devrecd.contract/1"  # bump when a field changes meaning
INPUT_NAME = "features"  # (batch, 128, 73) float32, NOT normalised: normalisation is in the graph
OUTPUT_NAME = "probs"  # (batch, n_labels) float32 softmax probabilities
EMBEDDING_NAME = "embedding"  # (batch, dim) float32 embeddings of an embedder export (not unit length)
BATCH_AXIS = "batch"  # the one dynamic axis
PRECISIONS = ("fp32", "fp16")
CLASSIFIER, EMBEDDER = "classifier", "embedder"  # the contract kinds ("kind" absent = classifier)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (``"batch"`` marks the dynamic axis) and dtype of one graph input or output."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(name=str(data["name"]), shape=tuple(data["shape"]), dtype=str(data["dtype"]))


def input_spec() -> TensorSpec:
    """The fixed input of every devrecd model: raw (un-normalised) features."""
    return TensorSpec(INPUT_NAME, (BATCH_AXIS, N_FRAMES, FEATURE_DIM), "float32")


def output_spec(n_labels: int) -> TensorSpec:
    """The fixed output: softmax probabilities over the labels (float32 even in an FP16 graph)."""
    return TensorSpec(OUTPUT_NAME, (BATCH_AXIS, n_labels), "float32")


@dataclass(frozen=True)
class Contract:
    """Everything a backend must agree with before it serves a model (see module docstring)."""

    name: str
    onnx_file: str  # file name of the ONNX model, relative to the contract's folder
    onnx_sha256: str
    onnx_bytes: int  # size, so that a truncated copy is named as such before hashing
    input: TensorSpec
    output: TensorSpec
    labels: tuple[str, ...]
    frontend: FrontendConfig
    frontend_fingerprint: str
    precision: str  # "fp32" | "fp16" (the network's arithmetic; input and normalisation stay fp32)
    opset: int
    arch: str
    checkpoint_sha256: str
    dataset_sha256: str = ""
    parity: dict = field(default_factory=dict)  # torch vs ONNX Runtime on real features
    versions: dict = field(default_factory=dict)  # software that made the export
    # NAME.ort: {"file", "sha256", "bytes", "onnxruntime", "optimization", "parity_max_abs_diff"}; {} = none
    ort: dict = field(default_factory=dict)
    # [low, high] SNR (dB, as devrecd.audio.noise measures a verdict's condition) of the recordings
    # the network was trained on (the low end lowered to the noise augmentation's); a verdict on a
    # noisier recording names no device. None: not recorded (an export made before it was).
    validated_snr_db: tuple[float, float] | None = None
    created: str = ""
    schema: str = SCHEMA

    # --- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the contract atomically (a reader never sees half a file)."""
        return atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "contract") -> Contract:
        """Validate and build; every problem is an :class:`ArtifactError` naming the field."""
        return _build(cls, data, CLASSIFIER, source, lambda d: dict(
            precision=str(d["precision"]), dataset_sha256=str(d.get("dataset_sha256", "")),
            ort=dict(d.get("ort") or {}), validated_snr_db=_snr_range(d.get("validated_snr_db"), source)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Contract:
        """Read and validate ``NAME.json`` (raises :class:`ArtifactError` with a specific reason)."""
        return cls.from_dict(read_contract_json(path), source=str(path))

    # --- checks --------------------------------------------------------------------------
    def validate(self, *, source: str = "contract") -> None:
        """Internal consistency: fixed I/O names and shapes, label count, frontend fingerprint."""
        problems = _file_problems(self)
        if self.output != output_spec(len(self.labels)):
            problems.append(f"output is {self.output}, expected {output_spec(len(self.labels))} "
                            f"for {len(self.labels)} labels")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            problems.append("labels must be at least two distinct names")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.ort:
            name, sha, size = self.ort.get("file"), self.ort.get("sha256"), self.ort.get("bytes")
            if not isinstance(name, str) or not name.endswith(".ort") or Path(name).name != name:
                problems.append(f"ort.file {name!r} must be a bare NAME.ort file name")
            if not isinstance(sha, str) or len(sha) != 64 or not isinstance(size, int) or size <= 0:
                problems.append("ort.sha256/ort.bytes missing")
        if self.validated_snr_db is not None and (bad := snr_range_problem("validated_snr_db", self.validated_snr_db)):
            problems.append(bad)
        if problems:
            raise ArtifactError(f"{source}: " + "; ".join(problems), reason="contract_invalid")

    def verify_onnx(self, onnx_path: str | os.PathLike) -> None:
        """Refuse an ONNX file that is not the one this contract describes (missing, truncated, other)."""
        _verify_file(Path(onnx_path), self.onnx_bytes, self.onnx_sha256, what="ONNX model", reason="onnx")

    def ort_file(self) -> str:
        """The ``NAME.ort`` file name this contract names, or "" (exported before .ort files)."""
        return str(self.ort.get("file", "")) if self.ort else ""

    def verify_ort(self, ort_path: str | os.PathLike) -> None:
        """Refuse an ORT-format file that is not the one this contract describes (missing, truncated, other)."""
        if not self.ort:
            raise ArtifactError(f"contract of {self.name!r} names no .ort file", reason="ort_missing")
        _verify_file(Path(ort_path), int(self.ort["bytes"]), str(self.ort["sha256"]), what="ORT-format model",
                     reason="ort")

    def check_frontend(self, frontend: FrontendConfig) -> None:
        """Refuse a model trained with other features than ``frontend`` (naming the parameters)."""
        check_frontend(self.frontend, frontend, model=self.name)

    def check_labels(self, labels: Sequence[str], *, what: str = "configured") -> None:
        """Refuse a model whose label list (order included) differs from ``labels``."""
        check_labels(self.labels, labels, model=self.name, what=what)


def embedding_spec(dim: int) -> TensorSpec:
    """The output of an embedder export: (batch, dim) float32 embeddings (the scorer makes them unit length)."""
    return TensorSpec(EMBEDDING_NAME, (BATCH_AXIS, dim), "float32")


@dataclass(frozen=True)
class EmbedderContract:
    """What an embedder export (``devrecd export-embedder``) expects and promises: the classifier's
    input, ``dim``-dimensional embeddings out, and the torch embedder's ``fingerprint`` (the network's
    identity in every registry enrolled with it)."""

    name: str
    onnx_file: str
    onnx_sha256: str
    onnx_bytes: int
    input: TensorSpec
    output: TensorSpec
    fingerprint: str  # devrecd.openset.embedder.fingerprint of the checkpoint: weights, normalisation, frontend, arch
    arch: str
    dim: int
    frontend: FrontendConfig
    frontend_fingerprint: str
    labels: tuple[str, ...]  # the devices the network was trained on (their count is what registries record)
    opset: int
    checkpoint_sha256: str
    parity: dict = field(default_factory=dict)  # torch vs ONNX Runtime embeddings on real features
    versions: dict = field(default_factory=dict)
    created: str = ""
    kind: str = EMBEDDER
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the contract atomically."""
        return atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "contract") -> EmbedderContract:
        """Validate and build; every problem is an :class:`ArtifactError` naming the field."""
        return _build(cls, data, EMBEDDER, source, lambda d: dict(fingerprint=str(d["fingerprint"]), dim=int(d["dim"])))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EmbedderContract:
        """Read and validate an embedder export's ``NAME.json``."""
        return cls.from_dict(read_contract_json(path), source=str(path))

    def validate(self, *, source: str = "contract") -> None:
        """Internal consistency: fixed I/O, dimension, fingerprints, file name."""
        problems = _file_problems(self)
        if self.dim < 1 or self.output != embedding_spec(self.dim):
            problems.append(f"output is {self.output}, expected {embedding_spec(self.dim)} for dim {self.dim}")
        if len(self.fingerprint) != 64:
            problems.append("fingerprint missing")
        if problems:
            raise ArtifactError(f"{source}: " + "; ".join(problems), reason="contract_invalid")

    def verify_onnx(self, onnx_path: str | os.PathLike) -> None:
        """Refuse an ONNX file that is not the one this contract describes (missing, truncated, other)."""
        _verify_file(Path(onnx_path), self.onnx_bytes, self.onnx_sha256, what="ONNX embedder", reason="onnx")


def _build(cls: Any, data: Any, kind: str, source: str, specific: Callable[[Mapping[str, Any]], dict]) -> Any:
    """A validated contract of ``kind`` from its JSON: the fields both kinds have, plus ``specific(data)``."""
    frontend = _check_header(data, cls, kind, source)
    try:
        contract = cls(
            name=str(data["name"]), onnx_file=str(data["onnx_file"]), onnx_sha256=str(data["onnx_sha256"]),
            onnx_bytes=int(data["onnx_bytes"]), input=TensorSpec.from_dict(data["input"]),
            output=TensorSpec.from_dict(data["output"]), labels=tuple(str(x) for x in data["labels"]),
            frontend=frontend, frontend_fingerprint=str(data["frontend_fingerprint"]), opset=int(data["opset"]),
            arch=str(data["arch"]), checkpoint_sha256=str(data["checkpoint_sha256"]),
            parity=dict(data.get("parity") or {}), versions=dict(data.get("versions") or {}),
            created=str(data.get("created", "")), **specific(data))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{source}: malformed field: {exc}", reason="contract_invalid") from None
    contract.validate(source=source)
    return contract


def _snr_range(value: Any, source: str) -> tuple[float, float] | None:
    """A contract's ``validated_snr_db`` as read from its JSON: None when absent (or null), else
    [low, high] (:func:`~devrecd.validation.snr_range_problem`), refused with the reason when not."""
    try:
        return read_snr_range("validated_snr_db", value)
    except ValueError as exc:
        raise ArtifactError(f"{source}: {exc}", reason="contract_invalid") from None


def _to_dict(contract: Any) -> dict[str, Any]:
    """A contract (either kind) as plain JSON types."""
    doc = asdict(contract)
    doc["input"]["shape"] = list(contract.input.shape)
    doc["output"]["shape"] = list(contract.output.shape)
    doc["labels"] = list(contract.labels)
    doc["frontend"] = contract.frontend.to_dict()
    return doc


def _file_problems(contract: Any) -> list[str]:
    """What both kinds promise: the fixed input, a consistent frontend, the ONNX file's name, sha256 and size."""
    problems = []
    if contract.input != input_spec():
        problems.append(f"input is {contract.input}, expected {input_spec()}")
    if contract.frontend.fingerprint() != contract.frontend_fingerprint:
        problems.append("frontend_fingerprint does not match the frontend parameters (edited by hand?)")
    if len(contract.onnx_sha256) != 64 or contract.onnx_bytes <= 0:
        problems.append("onnx_sha256/onnx_bytes missing")
    if Path(contract.onnx_file).name != contract.onnx_file:
        problems.append(f"onnx_file {contract.onnx_file!r} must be a bare file name")
    return problems


def read_contract_json(path: str | os.PathLike) -> Any:
    """The parsed JSON of a contract file (:class:`ArtifactError` when missing or not JSON)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"model contract not found: {path} (`devrecd export` and `devrecd export-embedder` "
                            "write NAME.json beside NAME.onnx)", reason="contract_missing") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read model contract {path}: {exc}", reason="contract_missing") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"model contract {path} is not valid JSON: {exc}", reason="contract_invalid") from None


def export_kind(onnx_path: str | os.PathLike) -> str:
    """``classifier`` or ``embedder``: the kind of export the contract beside ``onnx_path`` describes
    (raises :class:`ArtifactError` when there is no readable contract)."""
    data = read_contract_json(contract_path_for(onnx_path))
    return str(data.get("kind", CLASSIFIER)) if isinstance(data, Mapping) else ""


_KIND_HELP = {CLASSIFIER: "a classifier export (`devrecd export`: device probabilities, served with --model / "
                          "backend.model)",
              EMBEDDER: "an embedder export (`devrecd export-embedder`: open-set embeddings, served through a "
                        "device registry: registry.embedder_model, or --model of enroll/calibrate/compare/train-fusion)"}


def _check_header(data: Any, cls: type, kind: str, source: str) -> FrontendConfig:
    """Schema, kind and required fields of a contract of ``kind``; returns its frontend."""
    if not isinstance(data, Mapping):
        raise ArtifactError(f"{source}: not a JSON object", reason="contract_invalid")
    if data.get("schema") != SCHEMA:
        raise ArtifactError(f"{source}: schema {data.get('schema')!r} is not {SCHEMA!r} "
                            "(not a devrecd contract, or from another devrecd version: re-export)",
                            reason="contract_invalid")
    found = data.get("kind", CLASSIFIER)
    if found != kind:
        what = _KIND_HELP.get(found, f"of unknown kind {found!r}")
        raise ArtifactError(f"{source}: this model is {what}; {_KIND_HELP[kind].split(' (')[0]} is needed here",
                            reason="contract_kind")
    missing = [f.name for f in fields(cls) if f.name not in data and _required(f)]
    if missing:
        raise ArtifactError(f"{source}: missing field(s) {', '.join(missing)}", reason="contract_invalid")
    try:
        return FrontendConfig.from_dict(dict(data["frontend"]))
    except (ConfigError, TypeError) as exc:
        raise ArtifactError(f"{source}: bad frontend: {exc}", reason="contract_invalid") from None


def check_frontend(model_frontend: FrontendConfig, configured: FrontendConfig, *, model: str) -> None:
    """Refuse serving a model with other features than it was trained with, naming what differs."""
    if configured != model_frontend:
        raise ArtifactError(
            f"model {model!r} was trained with another frontend than the configured [frontend] "
            f"({configured.describe_mismatch(model_frontend)}); set [frontend] to the model's parameters "
            "or serve a model trained with these", reason="frontend_mismatch")


def check_labels(model_labels: Sequence[str], expected: Sequence[str], *, model: str, what: str = "configured") -> None:
    """Refuse a model whose label list (order included: outputs are positional) differs from ``expected``."""
    if tuple(expected) != tuple(model_labels):
        only_model = sorted(set(model_labels) - set(expected))
        only_other = sorted(set(expected) - set(model_labels))
        detail = (f"only in the model: {only_model}; only {what}: {only_other}"
                  if only_model or only_other else "same names in a different order")
        raise ArtifactError(f"model {model!r} labels differ from the {what} labels ({detail})",
                            reason="labels_mismatch")


def _verify_file(path: Path, size_want: int, sha_want: str, *, what: str, reason: str) -> None:
    """``path`` exists with the contract's size and sha256; reasons ``{reason}_missing|_truncated|_mismatch``."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ArtifactError(f"{what} not found: {path}", reason=f"{reason}_missing") from None
    if size < size_want:
        raise ArtifactError(f"{what} {path} is truncated: {size} bytes, the contract says "
                            f"{size_want} (copy it again)", reason=f"{reason}_truncated")
    digest = sha256_artifact(path, what)
    if size != size_want or digest != sha_want:
        raise ArtifactError(f"{what} {path} is not the one its contract describes (sha256 "
                            f"{digest[:12]}, contract {sha_want[:12]}): re-export, or use the "
                            "matching NAME.json", reason=f"{reason}_mismatch")


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def contract_path_for(onnx_path: str | os.PathLike) -> Path:
    """``export/NAME.onnx`` -> ``export/NAME.json``."""
    return Path(onnx_path).with_suffix(".json")


def load_for_onnx(onnx_path: str | os.PathLike, *, verify: bool = True, kind: type[Any] = Contract) -> Any:
    """The contract beside an ONNX file, checked against that file (sha256 and size); ``kind``
    :class:`Contract` (a classifier export) or :class:`EmbedderContract`."""
    onnx_path = Path(onnx_path)
    contract = kind.load(contract_path_for(onnx_path))
    if contract.onnx_file != onnx_path.name:
        raise ArtifactError(f"contract {contract_path_for(onnx_path)} describes {contract.onnx_file!r}, "
                            f"not {onnx_path.name!r}", reason="contract_mismatch")
    if verify:
        contract.verify_onnx(onnx_path)
    return contract
