"""TensorRT: engine naming and matching, profiles and batch plans (plain Python, run everywhere), and
the real engine build + runtime behind the ``gpu``/``tensorrt`` markers (skipped without a GPU)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from devrecd.audio import sha256_file
from devrecd.backends.tensorrt import (EngineMeta, GpuTarget, Profile, check_engine_meta, engine_stem, find_engine,
                                       meta_path_for, parse_engine_name, plan_runs, verify_plan)
from devrecd.cli import app
from devrecd.contract import Contract
from devrecd.errors import ArtifactError, ConfigError

H100 = GpuTarget("90", "10.8.0.43", "NVIDIA H100")
A10 = GpuTarget("86", "10.8.0.43", "NVIDIA A10")


def _have_trt_gpu() -> str:
    """Empty when TensorRT and a CUDA GPU are both usable, else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'devrecd[gpu]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return ""


@pytest.fixture
def trt_gpu() -> None:
    """Skip GPU tests, with the reason, where TensorRT or the GPU is missing (CI, laptops)."""
    why = _have_trt_gpu()
    if why:
        pytest.skip(why)


def _fake_engine(engine_dir: Path, contract: Contract, contract_sha: str, target: GpuTarget, *,
                 payload: bytes = b"plan bytes " * 100) -> Path:
    """An engine file + its JSON as build-engine lays them out (the plan bytes are not a real engine:
    everything tested with it is the naming/matching/metadata logic, which never deserialises)."""
    engine_dir.mkdir(parents=True, exist_ok=True)
    path = engine_dir / (engine_stem(contract.name, contract.onnx_sha256, target) + ".plan")
    path.write_bytes(payload)
    EngineMeta(engine_file=path.name, engine_sha256=sha256_file(path), engine_bytes=len(payload), name=contract.name,
               onnx_file=contract.onnx_file, onnx_sha256=contract.onnx_sha256, contract_sha256=contract_sha,
               contract=contract.to_dict(), precision=contract.precision, profile={"min": 1, "opt": 32, "max": 256},
               gpu={"name": target.gpu_name, "sm": target.sm}, versions={"tensorrt": target.trt_version}).save(
        meta_path_for(path))
    return path


@pytest.fixture(scope="module")
def contract(exported_model) -> tuple[Contract, str]:
    return Contract.load(exported_model.contract), sha256_file(exported_model.contract)


# --- names ---------------------------------------------------------------------------------------

def test_engine_name_round_trips_and_encodes_gpu_and_version() -> None:
    sha = "ab12cd34" + "0" * 56
    stem = engine_stem("paper-v2", sha, H100)
    assert stem == "paper-v2-ab12cd34-sm90-trt10.8.0.43"
    parsed = parse_engine_name(stem + ".plan")
    assert parsed is not None and (parsed.name, parsed.sha8, parsed.sm, parsed.trt_version) == \
        ("paper-v2", "ab12cd34", "90", "10.8.0.43")
    for other in ("paper.plan", "paper-ab12cd34-sm90.plan", "paper-ab12cd34-sm90-trt10.json", "timing.cache"):
        assert parse_engine_name(other) is None


# --- profiles and batch plans --------------------------------------------------------------------

def test_profile_must_be_ordered() -> None:
    Profile(1, 32, 256)
    for bad in ((0, 1, 2), (4, 2, 8), (1, 16, 8)):
        with pytest.raises(ConfigError, match="min <= opt <= max"):
            Profile(*bad)


def test_plan_runs_split_above_max_and_pad_below_min() -> None:
    p = Profile(4, 16, 32)
    assert list(plan_runs(10, p)) == [(slice(0, 10), 10)]
    assert list(plan_runs(2, p)) == [(slice(0, 2), 4)]  # padded up to the profile minimum
    assert sorted((s.stop - s.start, run) for s, run in plan_runs(70, p)) == [(23, 23), (23, 23), (24, 24)]
    for n in range(1, 200, 3):
        runs = list(plan_runs(n, p))
        covered = np.concatenate([np.arange(s.start, s.stop) for s, _ in runs])
        assert np.array_equal(covered, np.arange(n))
        assert all(p.min <= run <= p.max and run >= s.stop - s.start for s, run in runs)


# --- matching engines to this GPU, TensorRT version and model ------------------------------------

def test_find_engine_picks_only_the_one_for_this_gpu_and_version(contract, tmp_path: Path) -> None:
    c, c_sha = contract
    engine_dir = tmp_path / "engine"
    path, why = find_engine(engine_dir, c, H100, c_sha)
    assert path is None and "no engine for paper" in why
    _fake_engine(engine_dir, c, c_sha, A10)
    path, why = find_engine(engine_dir, c, H100, c_sha)
    assert path is None and "sm90" in why and "sm86/trt10.8.0.43" in why  # says what exists instead
    path, _ = find_engine(engine_dir, c, replace(H100, trt_version="10.3.0.26"), c_sha)
    assert path is None
    mine = _fake_engine(engine_dir, c, c_sha, H100)
    path, why = find_engine(engine_dir, c, H100, c_sha)
    assert path == mine and "matches sm90" in why
    # the same file name under a contract that changed since the build is rejected, with the reason
    path, why = find_engine(engine_dir, c, H100, "f" * 64)
    assert path is None and "another contract" in why


def test_engine_for_another_gpu_or_tensorrt_version_is_refused(contract, tmp_path: Path) -> None:
    c, c_sha = contract
    meta = EngineMeta.load(meta_path_for(_fake_engine(tmp_path, c, c_sha, A10)))
    with pytest.raises(ArtifactError, match="built for sm86.*this GPU is sm90") as err:
        check_engine_meta(meta, H100, contract=c, contract_sha256=c_sha)
    assert err.value.reason == "engine_gpu_mismatch"
    with pytest.raises(ArtifactError, match="TensorRT 10.8.0.43, this machine has 10.9") as err:
        check_engine_meta(meta, replace(A10, trt_version="10.9.0.34"), contract=c)
    assert err.value.reason == "engine_trt_mismatch"
    other = replace(c, onnx_sha256="e" * 64)
    with pytest.raises(ArtifactError, match="built from ONNX") as err:
        check_engine_meta(meta, A10, contract=other)
    assert err.value.reason == "engine_model_mismatch"
    check_engine_meta(meta, A10, contract=c, contract_sha256=c_sha)  # the right machine: accepted


def test_truncated_or_replaced_plan_is_refused(contract, tmp_path: Path) -> None:
    c, c_sha = contract
    path = _fake_engine(tmp_path, c, c_sha, H100)
    meta = EngineMeta.load(meta_path_for(path))
    assert verify_plan(path, meta) == path.read_bytes()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="truncated") as err:
        verify_plan(path, meta)
    assert err.value.reason == "engine_truncated"
    meta_path_for(path).write_text("{not json")
    with pytest.raises(ArtifactError) as err:
        EngineMeta.load(meta_path_for(path))
    assert err.value.reason == "engine_meta_invalid"


def test_engine_meta_embeds_the_contract(contract, tmp_path: Path) -> None:
    c, c_sha = contract
    meta = EngineMeta.load(meta_path_for(_fake_engine(tmp_path, c, c_sha, H100)))
    assert Contract.from_dict(meta.contract) == c and meta.batch_profile == Profile(1, 32, 256)
    assert meta.target == H100


# --- without a GPU: fail at once, saying what is missing and how to install it --------------------

@pytest.mark.skipif(not _have_trt_gpu(), reason="this machine has TensorRT and a GPU")
def test_build_engine_without_gpu_or_tensorrt_fails_at_once(exported_model, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["build-engine", str(exported_model), "--engine-dir", str(tmp_path / "e")])
    assert result.exit_code == 1
    assert "pip install 'devrecd[gpu]'" in result.output and ("TensorRT" in result.output or "GPU" in result.output)
    assert not (tmp_path / "e").exists()  # nothing was started


def test_build_engine_fp16_needs_the_fp16_export(exported_model, tmp_path: Path) -> None:
    from devrecd.engine_build import resolve_onnx

    onnx_path = exported_model.onnx
    with pytest.raises(ArtifactError, match="--fp16") as err:
        resolve_onnx(onnx_path, fp16=True)
    assert err.value.reason == "fp16_missing"
    assert resolve_onnx(onnx_path, fp16=False)[0] == onnx_path


# --- on a GPU with TensorRT (skipped here; run them where both exist) ----------------------------

@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_matches_onnxruntime_splits_batches_and_takes_cuda_tensors(trt_gpu, exported_model, tmp_path: Path) -> None:
    import torch

    from devrecd.backends import load_backend
    from devrecd.config import load_config
    from devrecd.engine_build import BuildOptions, build_engine
    from devrecd.export import parity_features_path

    result = build_engine(exported_model.onnx, BuildOptions(profile=Profile(1, 8, 16), engine_dir=tmp_path))
    assert result.meta.parity["passed"] and (tmp_path / "timing.cache").is_file()
    cfg = load_config(None, env={}, overrides={"backend.model": str(exported_model), "backend.engine_dir": str(tmp_path)})
    backend = load_backend(cfg.backend, cfg.frontend)  # auto: the matching engine is picked
    ort_b = load_backend(replace(cfg.backend, kind="onnxruntime"))
    try:
        assert backend.name == "tensorrt" and backend.max_batch == 16
        feats = np.load(parity_features_path(exported_model.onnx))
        big = np.concatenate([feats] * 3)  # above the profile max: split
        ref = ort_b.infer(big)
        assert np.max(np.abs(backend.infer(big) - ref)) < 1e-3
        assert len(backend.last_gpu_seconds) == -(-len(big) // 16)
        on_gpu = torch.from_numpy(big).cuda()
        assert np.max(np.abs(backend.infer(on_gpu) - ref)) < 1e-3  # device pointer in, no host copy
        # a second build reuses the timing cache
        again = build_engine(exported_model.onnx, BuildOptions(profile=Profile(1, 8, 16), engine_dir=tmp_path))
        assert again.meta.build_seconds <= result.meta.build_seconds * 1.5
    finally:
        backend.close()
        ort_b.close()


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_fp16_engine_within_tolerance(trt_gpu, trained_checkpoint: Path, ccnu_dir: Path, tmp_path: Path) -> None:
    from devrecd.config import load_config
    from devrecd.engine_build import BuildOptions, build_engine
    from devrecd.export import export_checkpoint

    out = tmp_path / "paper.onnx"
    export_checkpoint(trained_checkpoint, out, cfg=load_config(None, env={}),
                      parity_audio=sorted(ccnu_dir.glob("*_4.wav"))[:4], fp16=True)
    result = build_engine(out, BuildOptions(fp16=True, engine_dir=tmp_path / "engine"))
    assert result.meta.precision == "fp16" and result.meta.parity["passed"]
    assert result.meta.flags["strongly_typed"] and "-fp16-" in result.engine_path.name
    json.loads(meta_path_for(result.engine_path).read_text())
