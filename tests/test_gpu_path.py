"""The GPU serving path: torch backend options and selection, features kept on the device, and the
prepared GPU check (``benchmarks/gpu.py``) run on the CPU at its tiny size. Tests that need a CUDA
GPU are marked ``gpu`` and skip without one; everything else runs the same code on the CPU."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from devrecd.backends import load_backend
from devrecd.backends.torch_backend import GRAPH_MAX_BATCH, TorchBackend, bucket_for, graph_buckets
from devrecd.config import load_config
from devrecd.pipeline.batcher import gather
from devrecd.errors import ArtifactError, ConfigError
from devrecd.export import parity_features_path

REPO = Path(__file__).resolve().parents[1]


def _cfg(**overrides):
    return load_config(None, env={}, overrides={f"backend.{k}": v for k, v in overrides.items()})


@pytest.fixture(scope="module")
def feats(exported_model) -> np.ndarray:
    return np.load(parity_features_path(exported_model.onnx))


@pytest.fixture
def cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


# --- the torch backend on the CPU: the same code as on a GPU ----------------------------------------

def test_graph_buckets_cover_every_batch_with_the_smallest_bucket() -> None:
    buckets = graph_buckets()
    assert buckets[0] == 1 and buckets[-1] == GRAPH_MAX_BATCH and list(buckets) == sorted(set(buckets))
    assert graph_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    for n in range(1, GRAPH_MAX_BATCH + 1):
        b = bucket_for(n, buckets)
        assert b >= n and (b == 1 or b // 2 < n)  # never more than twice the rows
    with pytest.raises(ValueError, match="exceeds"):
        bucket_for(GRAPH_MAX_BATCH + 1, buckets)


def test_bf16_autocast_on_the_cpu_agrees_with_fp32_and_keeps_fp32_probabilities(exported_model, feats) -> None:
    fp32 = TorchBackend(exported_model.checkpoint, device="cpu")
    bf16 = TorchBackend(exported_model.checkpoint, device="cpu", autocast="bf16")
    try:
        a, b = fp32.infer(feats), bf16.infer(feats)
        assert b.dtype == np.float32 and b.shape == a.shape
        assert np.allclose(b.sum(-1), 1.0, atol=1e-5)  # softmax in FP32 under autocast
        assert np.abs(a - b).max() < 0.05 and np.abs(a - b).max() > 0  # bf16 really ran, and stayed close
        assert bf16.describe()["autocast"] == "bf16" and bf16.input_device is None  # CPU: numpy in, numpy out
    finally:
        fp32.close()
        bf16.close()


def test_a_tensor_on_the_backends_device_is_used_in_place(exported_model, feats) -> None:
    import torch

    backend = TorchBackend(exported_model.checkpoint, device="cpu")
    try:
        x = torch.from_numpy(feats)
        out = backend.infer_device(x)
        assert isinstance(out, torch.Tensor) and out.device == x.device
        assert np.allclose(out.numpy(), backend.infer(feats), atol=1e-6)
    finally:
        backend.close()


def test_torch_backend_options_are_validated(exported_model) -> None:
    with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA device"):
        TorchBackend(exported_model.checkpoint, device="cpu", cuda_graphs=True)
    with pytest.raises(ConfigError, match="autocast"):
        TorchBackend(exported_model.checkpoint, device="cpu", autocast="fp8")
    with pytest.raises(ConfigError, match="autocast must be"):
        _cfg(autocast="int8")
    with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA device"):
        _cfg(cuda_graphs=True, device="cpu")
    with pytest.raises(ConfigError, match="device must be"):
        _cfg(device="gpu")
    assert _cfg(autocast="fp16", cuda_graphs=True, device="cuda:1").backend.cuda_graphs


def test_torch_backend_on_a_missing_gpu_is_an_error_not_a_fallback(exported_model) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from devrecd.errors import MissingDependency

    with pytest.raises(MissingDependency, match="no CUDA GPU"):
        load_backend(_cfg(kind="torch", model=str(exported_model.checkpoint), device="cuda").backend)


# --- auto: torch on the GPU when CUDA is present, no engine matches and the checkpoint is known -----

def test_auto_with_the_exports_checkpoint_picks_torch_on_a_gpu_else_onnxruntime(exported_model, caplog) -> None:
    import torch

    cfg = _cfg(model=str(exported_model.onnx), checkpoint=str(exported_model.checkpoint))
    with caplog.at_level(logging.INFO, logger="devrecd.backends"):
        backend = load_backend(cfg.backend, cfg.frontend)
    try:
        why = [r for r in caplog.records if r.getMessage() == "backend selected"][-1]
        if torch.cuda.is_available():
            assert backend.name == "torch" and backend.describe()["device"].startswith("cuda")
            assert why.backend == "torch" and "checkpoint" in why.why
        else:
            assert backend.name == "onnxruntime" and why.backend == "onnxruntime"
    finally:
        backend.close()


def test_a_checkpoint_that_is_not_the_exports_is_refused(exported_model, tmp_path: Path) -> None:
    from devrecd.backends import _export_checkpoint

    cfg = _cfg(model=str(exported_model.onnx), checkpoint=str(exported_model.checkpoint))
    assert _export_checkpoint(cfg.backend, exported_model.onnx) == exported_model.checkpoint
    other = tmp_path / "other.pt"
    other.write_bytes(exported_model.checkpoint.read_bytes() + b"\0")  # any other bytes: another checkpoint
    with pytest.raises(ArtifactError, match="not the checkpoint") as err:
        _export_checkpoint(_cfg(model=str(exported_model.onnx), checkpoint=str(other)).backend, exported_model.onnx)
    assert err.value.reason == "checkpoint_mismatch"


# --- features stay where the frontend put them ----------------------------------------------------

def test_gather_keeps_tensors_as_tensors_and_numpy_as_numpy() -> None:
    import torch

    a = np.arange(2 * 128 * 73, dtype=np.float32).reshape(2, 128, 73)
    b = a[:1] + 1
    x = gather([a, b])
    assert isinstance(x, np.ndarray) and x.flags.c_contiguous and np.array_equal(x, np.concatenate([a, b]))
    t = gather([torch.from_numpy(a), b])  # a live (numpy) unit batched with a GPU-path (tensor) unit
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and np.array_equal(t.numpy(), x)


def test_features_on_device_equal_the_hosts(ccnu_dir: Path) -> None:
    import torch

    from devrecd.audio import read_evidence
    from devrecd.features import FrontendConfig, extract
    from devrecd.stages import clips_for, features_on_device, frontend_for

    cfg = FrontendConfig()
    rec = read_evidence(ccnu_dir / "Apple_air1_1.wav", cfg.sample_rate)
    clips = clips_for(rec, cfg, 2.0)
    got, times = features_on_device(clips, frontend_for(cfg), "cpu")
    assert isinstance(got, torch.Tensor) and set(times) == {"h2d", "frontend"}
    host = extract(clips, frontend_for(cfg))  # numpy on the host: the same code, float32 tolerance
    fbank = slice(39, 73)
    np.testing.assert_allclose(got.numpy()[..., : fbank.start], host[..., : fbank.start], atol=2e-4)
    np.testing.assert_allclose(got.numpy()[..., fbank], host[..., fbank], rtol=2e-4, atol=1e-6 * host[..., fbank].max())


def test_identify_takes_device_and_backend_on_the_command_line(exported_model, ccnu_dir: Path) -> None:
    from typer.testing import CliRunner

    from devrecd.cli import app

    result = CliRunner().invoke(app, ["identify", str(ccnu_dir / "Apple_air1_1.wav"), "--backend", "torch",
                                      "--model", str(exported_model.checkpoint), "--torch-device", "cpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.splitlines()[-1])
    assert record["outcome"] == "judged" and record["backend"] == "torch"
    assert "h2d" not in record["timings"]  # on the CPU the features never left the host


# --- TensorRT 11: strongly typed always, the deprecated flag not passed -------------------------------

def test_network_flags_follow_the_tensorrt_major_version() -> None:
    from devrecd.engine_build import network_flags

    flag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt10 = types.SimpleNamespace(__version__="10.13.0.35", NetworkDefinitionCreationFlag=flag)
    trt11 = types.SimpleNamespace(__version__="11.4.0.8", NetworkDefinitionCreationFlag=flag)
    assert network_flags(trt10) == (1 << 1, True)
    assert network_flags(trt11) == (0, True)


# --- on a GPU (skipped without one) ------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_graphs_and_autocast_agree_with_eager_fp32(cuda, exported_model, feats) -> None:
    import torch

    eager = TorchBackend(exported_model.checkpoint, device="cuda")
    graphs = TorchBackend(exported_model.checkpoint, device="cuda", autocast="fp16", cuda_graphs=True)
    try:
        graphs.warmup()
        for n in (1, 3, len(feats)):  # padded buckets, then the whole set
            a, b = eager.infer(feats[:n]), graphs.infer(feats[:n])
            assert np.abs(a - b).max() < 2e-2 and (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
        out = graphs.infer_device(torch.from_numpy(feats).cuda())
        assert out.is_cuda and out.shape == (len(feats), len(graphs.labels))
    finally:
        eager.close()
        graphs.close()


@pytest.mark.gpu
def test_identify_on_the_gpu_keeps_features_on_the_device(cuda, exported_model, ccnu_dir: Path) -> None:
    from devrecd.pipeline.identify import identify_files
    from devrecd.metrics import Metrics

    cfg = load_config(None, env={}, overrides={"backend.kind": "torch", "backend.model": str(exported_model.checkpoint),
                                               "backend.device": "cuda", "backend.cuda_graphs": True})
    metrics = Metrics()
    records = identify_files(cfg, sorted(ccnu_dir.glob("*_1.wav"))[:4], metrics=metrics)
    assert [r["outcome"] for r in records] == ["judged"] * 4
    assert all({"h2d", "frontend"} <= set(r["timings"]) for r in records)  # the device path ran


# --- the prepared GPU check, at its tiny size on the CPU (so that it cannot rot) ---------------------

def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_reports_every_section(ccnu_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny",
                           "--minutes", "2", "--data", str(ccnu_dir), "--out", str(out), "--shm", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert {"machine", "audio", "model", "frontend", "network", "end_to_end", "tensorrt", "openset", "target_check"} <= set(r)
    assert r["audio"].startswith("real:")
    fe = r["frontend"]
    assert len(fe["parity"]["max_abs_diff_per_dim"]) == 73 and all(map(_finite, fe["parity"]["max_abs_diff_per_dim"]))
    assert fe["fp16_overflow"]["tone as int16 values (unscaled)"]["overflows_fp16"] is True  # the risk is real
    assert _finite(fe["cpu_baseline"]["clips_per_s"]) and fe["throughput"]
    assert all(_finite(row["clips_per_s"]) and row["clips_per_s"] > 0 for row in fe["throughput"])
    net = r["network"]
    assert [v["variant"] for v in net["variants"]] == ["fp32", "bf16 autocast"]
    for v in net["variants"]:
        assert "error" not in v, v.get("error")
        a = v["agreement"]
        assert a["windows"] > 0 and 0 <= a["top1_agreement"] <= 1 and _finite(a["max_prob_diff"])
        assert v["cells"] and all(_finite(c["clips_per_s"]) and _finite(c["p99_ms"]) for c in v["cells"])
    assert net["variants"][0]["agreement"]["max_prob_diff"] < 1e-5  # FP32 vs FP32 on the CPU: the same numbers
    e2e = r["end_to_end"]
    for run in (e2e["gpu_path"], e2e["cpu_baseline"]):
        assert run["judged"] == run["files"] > 0 and _finite(run["files_per_s"]) and run["files_per_s"] > 0
        assert {"decode", "features", "inference", "writer"} <= set(run["stages"])
    assert e2e["backlog"]["files"] == 16 and _finite(e2e["speedup_vs_cpu"])
    assert "EXTRAPOLATED" in e2e["cpu_baseline"]["label"]
    assert "skipped" in r["tensorrt"] or r["tensorrt"]["engines"]
    assert len(r["target_check"]) == 6
    gsv = r["openset"]  # the shipped GSV scorer in torch (on the CPU here) vs numpy
    assert gsv["parity"]["recordings"] > 0 and gsv["parity"]["met"], gsv["parity"]
    for run in (gsv["gpu_path"], gsv["cpu_baseline"]):
        assert run["judged"] == run["files"] > 0 and {"decode", "features", "scoring", "writer"} <= set(run["stages"])
    assert "EXTRAPOLATED" in gsv["cpu_baseline"]["label"] and _finite(gsv["speedup_vs_cpu"])
