"""``devrecd build-engine``: an exported ONNX model -> a TensorRT engine for THIS GPU, checked.

Steps (TensorRT 10/11 Python API; nothing here runs without a GPU and TensorRT):

1. Load the contract beside the ONNX (sha256 checked); with ``fp16`` use the FP16 export
   ``NAME-fp16.onnx`` (input + normalisation FP32, network FP16). The network is created
   STRONGLY_TYPED (TensorRT 10; the only mode in 11): precision comes from the graph's tensor types,
   so the FP16 engine keeps normalisation and softmax in FP32 exactly as exported.
2. ``OnnxParser.parse_from_file`` (weights are inline); every parser error is reported.
3. One optimisation profile for the batch axis (min/opt/max), a workspace limit, and a timing cache
   file shared by all builds (``engine_dir/timing.cache``) so that rebuilds skip kernel timing.
4. ``build_serialized_network`` -> ``engine/NAME-<sha8>-sm<cc>-trt<version>.plan`` + JSON.
5. The engine and ONNX Runtime (the FP32 export) run the export's own parity features; only within
   tolerance is the build a success, otherwise the plan is deleted and the build fails.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from devrecd import __version__
from devrecd.backends.tensorrt import (EngineMeta, GpuTarget, Profile, TensorRTBackend, current_target, engine_stem,
                                       import_tensorrt, meta_path_for, require_cuda)
from devrecd.contract import INPUT_NAME, Contract, contract_path_for, load_for_onnx
from devrecd.errors import ArtifactError
from devrecd.backends.onnxrt import ort_session
from devrecd.export import TOLERANCE, fp16_path_for, load_parity_features
from devrecd.fsutil import atomic_write

log = logging.getLogger("devrecd.engine")

TIMING_CACHE_NAME = "timing.cache"


@dataclass(frozen=True)
class BuildOptions:
    profile: Profile = Profile(1, 32, 256)
    fp16: bool = False
    workspace_mib: int = 2048
    engine_dir: Path = Path("engine")
    timing_cache: Path | None = None  # default: engine_dir/timing.cache
    device: int = 0


@dataclass(frozen=True)
class BuildResult:
    engine_path: Path
    meta: EngineMeta


def resolve_onnx(onnx_path: str | os.PathLike, fp16: bool) -> tuple[Path, Contract]:
    """The ONNX file to build from and its verified contract (the FP16 variant for ``fp16``)."""
    onnx_path = Path(onnx_path)
    contract = load_for_onnx(onnx_path)
    if fp16 and contract.precision != "fp16":
        variant = fp16_path_for(onnx_path)
        if not variant.exists():
            raise ArtifactError(f"--fp16 needs the FP16 export {variant} (TensorRT builds precision from the "
                                f"graph's types): run `devrecd export ... --out {onnx_path} --fp16` first",
                                reason="fp16_missing")
        return variant, load_for_onnx(variant)
    return onnx_path, contract


def parser_errors(parser: Any) -> list[str]:
    """Every error the ONNX parser recorded, one line each, with the node when known."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = ""
        if hasattr(err, "node_name") and err.node_name():
            node = f" at node {err.node_name()} ({err.node_operator()})"
        elif err.node() >= 0:
            node = f" at node #{err.node()}"
        lines.append(f"{err.code()}: {err.desc()}{node}")
    return lines


def trt_major(trt: Any) -> int:
    """TensorRT's major version (10, 11, ...) from ``tensorrt.__version__``."""
    try:
        return int(str(trt.__version__).split(".", 1)[0])
    except ValueError:
        return 0


def network_flags(trt: Any) -> tuple[int, bool]:
    """Creation flags: STRONGLY_TYPED on TensorRT 10; none on 11+, which builds strongly typed networks
    only and keeps the flag merely as a deprecated, ignored name (it may go in a later release)."""
    if trt_major(trt) >= 11:
        return 0, True
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        return 0, True
    return 1 << int(flag), True


def build_engine(onnx_path: str | os.PathLike, options: BuildOptions) -> BuildResult:
    """Build, save and verify an engine; raises :class:`MissingDependency` at once without GPU/TensorRT."""
    trt = import_tensorrt()  # fail fast, before any work, naming what is missing
    torch = require_cuda(options.device)
    target = current_target(options.device)
    onnx_path, contract = resolve_onnx(onnx_path, options.fp16)
    contract_sha = sha256_artifact(contract_path_for(onnx_path))
    engine_dir = Path(options.engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    cache_path = options.timing_cache or engine_dir / TIMING_CACHE_NAME

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags, strongly_typed = network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = parser_errors(parser)
        raise ArtifactError(f"TensorRT {trt.__version__} cannot parse {onnx_path} ({len(errors)} error(s)):\n  "
                            + "\n  ".join(errors or ["(no detail from the parser)"]), reason="onnx_parse")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    p = options.profile
    profile = builder.create_optimization_profile()
    feat = tuple(contract.input.shape[1:])
    profile.set_shape(INPUT_NAME, (p.min, *feat), (p.opt, *feat), (p.max, *feat))
    config.add_optimization_profile(profile)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ArtifactError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} "
                            "(see the TensorRT log above)", reason="engine_build")
    _write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - t0

    stem = engine_stem(contract.name, contract.onnx_sha256, target)
    engine_path = engine_dir / f"{stem}.plan"
    _write_atomic(engine_path, memoryview(plan))
    meta = EngineMeta(
        engine_file=engine_path.name, engine_sha256=sha256_artifact(engine_path), engine_bytes=engine_path.stat().st_size,
        name=contract.name, onnx_file=onnx_path.name, onnx_sha256=contract.onnx_sha256, contract_sha256=contract_sha,
        contract=contract.to_dict(), precision=contract.precision,
        profile={"min": p.min, "opt": p.opt, "max": p.max}, gpu={"name": target.gpu_name, "sm": target.sm},
        versions={"tensorrt": target.trt_version, "cuda": str(torch.version.cuda), "torch": torch.__version__,
                  "devrecd": __version__},
        flags={"strongly_typed": strongly_typed, "network_flags": flags, "workspace_mib": options.workspace_mib,
               "timing_cache": str(cache_path)},
        build_seconds=round(seconds, 1), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    meta.save(meta_path_for(engine_path))
    try:
        parity = verify_engine(engine_path, onnx_path, contract, contract_sha, target, device=options.device)
    except BaseException:
        engine_path.unlink(missing_ok=True)  # never leave an unverified engine for `auto` to pick up
        meta_path_for(engine_path).unlink(missing_ok=True)
        raise
    meta = EngineMeta(**{**meta.__dict__, "parity": parity})
    meta.save(meta_path_for(engine_path))
    return BuildResult(engine_path, meta)


def verify_engine(engine_path: Path, onnx_path: Path, contract: Contract, contract_sha: str, target: GpuTarget,
                  *, device: int = 0) -> dict:
    """Engine vs ONNX Runtime (the FP32 export) on the export's parity features; raises above tolerance."""
    feats, source = load_parity_features(onnx_path, contract)
    reference_onnx = onnx_path
    if contract.precision == "fp16":  # compare with the FP32 model, which is what FP16 approximates
        fp32 = onnx_path.with_name(onnx_path.name.replace("-fp16.onnx", ".onnx"))
        if fp32.exists():
            reference_onnx = fp32
    expected = ort_session(reference_onnx, threads=os.cpu_count() or 1).run(None, {INPUT_NAME: feats})[0]
    backend = TensorRTBackend(engine_path, contract=contract, contract_sha256=contract_sha, device=device)
    try:
        got = backend.infer(feats)
    finally:
        backend.close()
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    tol = TOLERANCE[contract.precision]
    result = {"n_clips": len(feats), "max_abs_diff": diff, "tolerance": tol, "source": source,
              "reference": reference_onnx.name,
              "top1_agreement": float(np.mean(got.argmax(-1) == expected.argmax(-1))), "passed": diff <= tol}
    log.info("engine parity", extra=result)
    if diff > tol:
        raise ArtifactError(f"engine {engine_path.name} disagrees with ONNX Runtime: max abs difference {diff:.3g} > "
                            f"{tol:g} on {len(feats)} clips; the engine was removed", reason="engine_parity")
    return result


def _write_atomic(path: Path, data: memoryview) -> None:
    atomic_write(path, bytes(data))
