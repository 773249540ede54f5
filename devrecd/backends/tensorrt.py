"""TensorRT engines: naming, matching this GPU, and the runtime backend.

An engine is valid only for the GPU architecture and the exact TensorRT version it was built with,
so both are in its file name and in the JSON written beside it::

    engine/NAME-<onnx sha256[:8]>-sm<major><minor>-trt<tensorrt version>.plan
    engine/NAME-<onnx sha256[:8]>-sm<major><minor>-trt<tensorrt version>.json   (EngineMeta)

The runtime binds I/O by tensor name (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``) on torch's current CUDA stream; the buffers are torch tensors, so there is one
CUDA context (torch's primary context) and no pycuda at all. Features already on the GPU (the CUDA
frontend) are passed by device pointer without a host round trip. Batches above the engine's
profile maximum are split; below its minimum they are padded.

``tensorrt`` and CUDA are imported inside functions: this module imports on any machine, and
everything that does not need a GPU (names, matching, profiles, batch plans) is plain Python.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from devrecd.backends.base import (INSTALL_GPU_HINT, InferenceError, batch_slices, check_features_shape, cuda_index,
                                   is_checkpoint, need_model, snr_range_json)
from devrecd.contract import INPUT_NAME, OUTPUT_NAME, Contract, contract_path_for, load_for_onnx
from devrecd.errors import ArtifactError, ConfigError, MissingDependency
from devrecd.fsutil import atomic_write, sha256_artifact

if TYPE_CHECKING:
    from devrecd.config import BackendConfig

log = logging.getLogger("devrecd.backends.tensorrt")

ENGINE_SUFFIX = ".plan"
_ENGINE_RE = re.compile(r"^(?P<name>.+)-(?P<sha8>[0-9a-f]{8})-sm(?P<sm>\d+)-trt(?P<trt>\d+(?:\.\d+)*)\.plan$")


# --- what this machine is ----------------------------------------------------------------------

@dataclass(frozen=True)
class GpuTarget:
    """What an engine must have been built for to run here."""

    sm: str  # compute capability without the dot: "90" for an H100, "86" for an RTX 30x0
    trt_version: str  # tensorrt.__version__, e.g. "10.8.0.43"
    gpu_name: str = ""


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`MissingDependency` saying how to install it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependency(f"TensorRT is not installed ({exc}): {INSTALL_GPU_HINT}") from None
    return tensorrt


def require_cuda(device: int = 0) -> Any:
    """torch with a usable CUDA device, or :class:`MissingDependency` naming what is missing."""
    import torch

    if not torch.version.cuda:
        raise MissingDependency(f"this torch ({torch.__version__}) is a CPU build: install a CUDA build of torch "
                                f"and {INSTALL_GPU_HINT}")
    if not torch.cuda.is_available() or torch.cuda.device_count() <= device:
        raise MissingDependency(f"no CUDA GPU visible (device {device}): TensorRT needs an NVIDIA GPU; "
                                f"on a GPU machine: {INSTALL_GPU_HINT}")
    return torch


def current_target(device: int = 0) -> GpuTarget:
    """This machine's GPU architecture and TensorRT version (needs both)."""
    trt = import_tensorrt()
    torch = require_cuda(device)
    major, minor = torch.cuda.get_device_capability(device)
    return GpuTarget(f"{major}{minor}", trt.__version__, torch.cuda.get_device_name(device))


# --- engine names and metadata ---------------------------------------------------------------

def engine_stem(name: str, onnx_sha256: str, target: GpuTarget) -> str:
    """``NAME-<sha8>-sm<cc>-trt<version>`` (the .plan and .json share it)."""
    return f"{name}-{onnx_sha256[:8]}-sm{target.sm}-trt{target.trt_version}"


@dataclass(frozen=True)
class EngineName:
    name: str
    sha8: str
    sm: str
    trt_version: str


def parse_engine_name(filename: str) -> EngineName | None:
    """The parts of an engine file name, or None for a file that is not a devrecd engine."""
    m = _ENGINE_RE.match(filename)
    return EngineName(m["name"], m["sha8"], m["sm"], m["trt"]) if m else None


@dataclass(frozen=True)
class Profile:
    """The engine's one optimisation profile for the batch axis."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            from devrecd.errors import ConfigError

            raise ConfigError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


def plan_runs(n: int, profile: Profile) -> Iterator[tuple[slice, int]]:
    """Engine runs for a batch of ``n``: (rows of the batch, batch size actually run).

    Above ``profile.max`` the batch is split into balanced chunks; a chunk below ``profile.min`` is
    run padded up to ``min`` (the extra rows' outputs are dropped).
    """
    for sl in batch_slices(n, profile.max):
        yield sl, max(sl.stop - sl.start, profile.min)


@dataclass(frozen=True)
class EngineMeta:
    """The JSON beside an engine: what it was built from, for which GPU, with which flags."""

    engine_file: str
    engine_sha256: str
    engine_bytes: int
    name: str
    onnx_file: str
    onnx_sha256: str
    contract_sha256: str
    contract: dict  # the full contract, so an engine describes itself
    precision: str
    profile: dict  # {"min", "opt", "max"}
    gpu: dict  # {"name", "sm"}
    versions: dict  # tensorrt, cuda, torch, devrecd
    flags: dict = field(default_factory=dict)  # builder flags, workspace, strongly typed, ...
    parity: dict = field(default_factory=dict)  # engine vs ONNX Runtime on the same inputs
    build_seconds: float = 0.0
    created: str = ""

    @property
    def target(self) -> GpuTarget:
        return GpuTarget(str(self.gpu.get("sm", "")), str(self.versions.get("tensorrt", "")), str(self.gpu.get("name", "")))

    @property
    def batch_profile(self) -> Profile:
        return Profile(int(self.profile["min"]), int(self.profile["opt"]), int(self.profile["max"]))

    def save(self, path: Path) -> Path:
        return atomic_write(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> EngineMeta:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactError(f"engine metadata {path} not found: every engine needs the JSON that "
                                "`devrecd build-engine` writes beside it", reason="engine_meta_missing") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"engine metadata {path} is unreadable: {exc}", reason="engine_meta_invalid") from None
        try:
            return cls(**data)
        except TypeError as exc:
            raise ArtifactError(f"engine metadata {path} is malformed: {exc}", reason="engine_meta_invalid") from None


def meta_path_for(engine_path: str | os.PathLike) -> Path:
    return Path(engine_path).with_suffix(".json")


def check_engine_meta(meta: EngineMeta, target: GpuTarget, *, contract: Contract | None = None,
                      contract_sha256: str = "", where: str = "engine") -> None:
    """Refuse an engine built for another GPU/TensorRT version, or from another model, saying which."""
    built = meta.target
    if built.sm != target.sm:
        raise ArtifactError(f"{where} was built for sm{built.sm} ({built.gpu_name or 'unknown GPU'}), this GPU is "
                            f"sm{target.sm} ({target.gpu_name}): engines only run on the architecture they were "
                            "built for; run `devrecd build-engine` on this machine", reason="engine_gpu_mismatch")
    if built.trt_version != target.trt_version:
        raise ArtifactError(f"{where} was built with TensorRT {built.trt_version}, this machine has "
                            f"{target.trt_version}: rebuild it with `devrecd build-engine`",
                            reason="engine_trt_mismatch")
    if contract is not None and meta.onnx_sha256 != contract.onnx_sha256:
        raise ArtifactError(f"{where} was built from ONNX {meta.onnx_sha256[:12]}, the configured model is "
                            f"{contract.onnx_sha256[:12]} ({contract.name}): rebuild it from this model",
                            reason="engine_model_mismatch")
    if contract_sha256 and meta.contract_sha256 != contract_sha256:
        raise ArtifactError(f"{where} was built under another contract ({meta.contract_sha256[:12]} != "
                            f"{contract_sha256[:12]}): rebuild it from the current export", reason="engine_model_mismatch")


def verify_plan(engine_path: Path, meta: EngineMeta) -> bytes:
    """The plan's bytes, refused when missing, truncated or not the file its JSON describes."""
    try:
        size = engine_path.stat().st_size
    except FileNotFoundError:
        raise ArtifactError(f"TensorRT engine not found: {engine_path}", reason="engine_missing") from None
    if size < meta.engine_bytes:
        raise ArtifactError(f"TensorRT engine {engine_path} is truncated ({size} of {meta.engine_bytes} bytes)",
                            reason="engine_truncated")
    if size != meta.engine_bytes or sha256_artifact(engine_path) != meta.engine_sha256:
        raise ArtifactError(f"TensorRT engine {engine_path} is not the file its JSON describes (sha256 differs)",
                            reason="engine_mismatch")
    return engine_path.read_bytes()


def find_engine(engine_dir: str | os.PathLike, contract: Contract, target: GpuTarget,
                contract_sha256: str = "") -> tuple[Path | None, str]:
    """The engine in ``engine_dir`` for this model, GPU and TensorRT version; else None and why not."""
    engine_dir = Path(engine_dir)
    wanted = engine_stem(contract.name, contract.onnx_sha256, target) + ENGINE_SUFFIX
    candidates = sorted(engine_dir.glob(f"*{ENGINE_SUFFIX}")) if engine_dir.is_dir() else []
    same_model = [p for p in candidates if (n := parse_engine_name(p.name)) and n.sha8 == contract.onnx_sha256[:8]]
    path = engine_dir / wanted
    if path in same_model:
        try:
            check_engine_meta(EngineMeta.load(meta_path_for(path)), target, contract=contract,
                              contract_sha256=contract_sha256, where=str(path))
        except ArtifactError as exc:
            return None, f"{path.name} rejected: {exc}"
        return path, f"{path.name} matches sm{target.sm} and TensorRT {target.trt_version}"
    if same_model:
        others = ", ".join(f"sm{n.sm}/trt{n.trt_version}" for p in same_model if (n := parse_engine_name(p.name)))
        return None, (f"no engine for sm{target.sm}/TensorRT {target.trt_version} in {engine_dir} "
                      f"(this model has engines for {others})")
    return None, f"no engine for {contract.name} ({contract.onnx_sha256[:8]}) in {engine_dir}"


# --- the runtime backend ---------------------------------------------------------------------

class TensorRTBackend:
    """A deserialised engine bound by tensor name, running on torch's current CUDA stream."""

    name = "tensorrt"

    @classmethod
    def from_config(cls, cfg: BackendConfig, model: Path | None, engine: Path | None = None) -> TensorRTBackend:
        """``engine``, else ``backend.engine``, else the engine in ``backend.engine_dir`` built from
        ``model`` for this GPU and TensorRT version."""
        device = cuda_index(cfg.device)
        contract = contract_sha = None
        if model is not None:
            model = need_model(model, cls.name)
            if is_checkpoint(model):
                raise ArtifactError("backend.kind = 'tensorrt' serves an exported model: export the checkpoint, then "
                                    "`devrecd build-engine export/NAME.onnx`", reason="not_onnx")
            contract = load_for_onnx(model)
            contract_sha = sha256_artifact(contract_path_for(model))
        if engine is None and cfg.engine:
            engine = Path(cfg.engine)
        if engine is None:
            if contract is None:
                raise ConfigError("backend.kind = 'tensorrt' needs backend.engine or backend.model")
            found, why = find_engine(cfg.engine_dir, contract, current_target(device), contract_sha or "")
            if found is None:
                raise ArtifactError(f"{why}: build one with `devrecd build-engine {model}`", reason="engine_missing")
            engine = found
        return cls(engine, contract=contract, contract_sha256=contract_sha or "", device=device)

    def __init__(self, engine_path: str | os.PathLike, *, contract: Contract | None = None,
                 contract_sha256: str = "", device: int = 0) -> None:
        trt = import_tensorrt()
        torch = require_cuda(device)
        self.engine_path = Path(engine_path)
        self.meta = EngineMeta.load(meta_path_for(self.engine_path))
        self.target = current_target(device)
        check_engine_meta(self.meta, self.target, contract=contract, contract_sha256=contract_sha256,
                          where=str(self.engine_path))
        self.contract = contract or Contract.from_dict(self.meta.contract, source=f"{self.engine_path} (embedded)")
        plan = verify_plan(self.engine_path, self.meta)
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise ArtifactError(f"TensorRT could not deserialise {self.engine_path}", reason="engine_invalid")
            self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT_NAME] or sorted(names) != sorted([INPUT_NAME, OUTPUT_NAME]):
            raise ArtifactError(f"{self.engine_path}: engine tensors {names} are not {INPUT_NAME} -> {OUTPUT_NAME}",
                                reason="contract_mismatch")
        for n in names:
            if self._engine.get_tensor_dtype(n) != trt.DataType.FLOAT:
                raise ArtifactError(f"{self.engine_path}: tensor {n} is {self._engine.get_tensor_dtype(n)}, "
                                    "the contract says float32", reason="contract_mismatch")
        lo, opt, hi = self._engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.profile = Profile(int(lo[0]), int(opt[0]), int(hi[0]))
        self.labels = self.contract.labels
        self.frontend = self.contract.frontend
        self.max_batch: int | None = self.profile.max
        self.input_device: str | None = str(self.device)  # CUDA tensors here are bound by pointer, in place
        self.concurrency: int | None = 1  # one execution context on one stream
        self.last_gpu_seconds: list[float] = []  # per engine run of the last infer() (CUDA events)

    def infer_device(self, features: Any) -> Any:
        """(B, 128, 73) features -> (B, N) probabilities as a CUDA tensor (no host copy of the output).

        A CUDA float32 tensor is used in place (its device pointer goes to the engine); numpy and
        CPU tensors are copied to the GPU once.
        """
        import torch

        if self._context is None:
            raise InferenceError("backend is closed", reason="closed")
        if isinstance(features, torch.Tensor):
            check_features_shape(tuple(features.shape))
            x = features.to(self.device, torch.float32).contiguous()
        else:
            arr = np.ascontiguousarray(features, dtype=np.float32)
            check_features_shape(arr.shape)
            x = torch.from_numpy(arr).to(self.device, non_blocking=False)
        n, n_out = x.shape[0], len(self.labels)
        out = torch.empty((n, n_out), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device)
        events = []
        with torch.cuda.device(self.device):
            for rows, run in plan_runs(n, self.profile):
                xb, ob = x[rows], out[rows]
                if run > xb.shape[0]:  # below the profile minimum: pad, run, keep the real rows
                    xb = torch.cat([xb, xb.new_zeros((run - xb.shape[0], *xb.shape[1:]))])
                    ob = torch.empty((run, n_out), dtype=torch.float32, device=self.device)
                self._context.set_input_shape(INPUT_NAME, tuple(xb.shape))
                self._context.set_tensor_address(INPUT_NAME, xb.data_ptr())
                self._context.set_tensor_address(OUTPUT_NAME, ob.data_ptr())
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                if not self._context.execute_async_v3(stream.cuda_stream):
                    raise InferenceError(f"TensorRT execution failed on a batch of {run}")
                end.record(stream)
                events.append((start, end))
                if ob.data_ptr() != out[rows].data_ptr():
                    out[rows].copy_(ob[: rows.stop - rows.start])
            end.synchronize()  # the last event: every run on this stream has finished
        self.last_gpu_seconds = [s.elapsed_time(e) / 1000.0 for s, e in events]
        return out

    def infer(self, features: Any) -> np.ndarray:
        """(B, 128, 73) features (numpy, or a torch tensor, on the GPU for no host copy) -> (B, N) numpy."""
        return self.infer_device(features).cpu().numpy()

    def warmup(self) -> None:
        self.infer(np.zeros((self.profile.opt, 128, 73), np.float32))

    def describe(self) -> dict:
        return {"name": self.name, "version": self.target.trt_version,
                "device": f"{self.device} {self.target.gpu_name} sm{self.target.sm}",
                "model": self.meta.onnx_file, "model_sha256": self.meta.onnx_sha256,
                "contract_sha256": self.meta.contract_sha256, "precision": self.meta.precision,
                "engine": str(self.engine_path), "engine_sha256": self.meta.engine_sha256,
                "profile": asdict(self.profile), "labels": len(self.labels),
                "validated_snr_db": snr_range_json(self.contract.validated_snr_db)}

    def close(self) -> None:
        self._context = None
        self._engine = None
