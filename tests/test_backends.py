"""Backends: load_backend selection, ONNX Runtime / torch serving, and refusal of bad artifacts."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from devrecd.backends import Backend, InferenceError, batch_slices, load_backend
from devrecd.backends.onnxrt import RUN_BATCH
from devrecd.config import load_config
from devrecd.contract import Contract, load_for_onnx
from devrecd.errors import ArtifactError, ConfigError, MissingDependency
from devrecd.export import ort_path_for, parity_features_path


def _copy_export(exported_model, dst: Path) -> Path:
    """A private copy of the session export (ONNX + ORT + contract + parity features) to damage."""
    onnx_path = exported_model.onnx
    for src in (onnx_path, ort_path_for(onnx_path), onnx_path.with_suffix(".json"), parity_features_path(onnx_path)):
        shutil.copy(src, dst / src.name)
    return dst / onnx_path.name


def _cfg(**overrides):
    return load_config(None, env={}, overrides={f"backend.{k}": v for k, v in overrides.items()})


@pytest.fixture(scope="module")
def feats(exported_model) -> np.ndarray:
    return np.load(parity_features_path(exported_model.onnx))


def test_auto_without_gpu_serves_onnxruntime_and_says_why(exported_model, feats, caplog) -> None:
    cfg = _cfg(model=str(exported_model), threads=1)
    with caplog.at_level(logging.INFO, logger="devrecd.backends"):
        backend = load_backend(cfg.backend, load_config(None, env={}).frontend)
    try:
        # ORT takes any batch, run in slices of RUN_BATCH windows (its working memory grows per window of a run).
        assert isinstance(backend, Backend) and backend.name == "onnxruntime" and backend.max_batch == RUN_BATCH
        why = [r for r in caplog.records if r.getMessage() == "backend selected"]
        assert why and why[0].backend == "onnxruntime" and ("TensorRT" in why[0].why or "engine" in why[0].why)
        backend.warmup()
        probs = backend.infer(feats)
        assert probs.dtype == np.float32 and probs.shape == (len(feats), 15)
        assert np.allclose(probs.sum(-1), 1.0, atol=1e-5)
        d = backend.describe()
        contract = load_for_onnx(exported_model.onnx)
        assert d["name"] == "onnxruntime" and d["model_sha256"] == contract.onnx_sha256 and len(d["contract_sha256"]) == 64
        assert d["version"] and "cpu" in d["device"]
    finally:
        backend.close()


def test_torch_backend_and_torch_tensor_input_agree_with_onnxruntime(exported_model, feats) -> None:
    import torch

    ort_b = load_backend(_cfg(model=str(exported_model), kind="onnxruntime", threads=1).backend)
    torch_b = load_backend(_cfg(model=str(exported_model.checkpoint), kind="torch", device="cpu").backend)
    try:
        assert torch_b.name == "torch" and torch_b.labels == ort_b.labels and torch_b.frontend == ort_b.frontend
        a = ort_b.infer(torch.from_numpy(feats))  # torch tensors are accepted as input
        b = torch_b.infer(feats)
        assert np.max(np.abs(a - b)) < 1e-4
    finally:
        ort_b.close()
        torch_b.close()


def test_bad_input_shape_is_an_inference_error(exported_model) -> None:
    backend = load_backend(_cfg(model=str(exported_model), kind="onnxruntime", threads=1).backend)
    try:
        with pytest.raises(InferenceError, match=r"\(batch, 128, 73\)"):
            backend.infer(np.zeros((2, 128, 72), np.float32))
    finally:
        backend.close()


# --- refusals: each names which artifact and why ---------------------------------------------------

def test_truncated_onnx_is_refused(exported_model, tmp_path: Path) -> None:
    onnx_path = _copy_export(exported_model, tmp_path)
    data = onnx_path.read_bytes()
    onnx_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated") as err:
        load_backend(_cfg(model=str(onnx_path), kind="onnxruntime").backend)
    assert err.value.reason == "onnx_truncated"


def test_onnx_that_is_not_the_contracts_is_refused(exported_model, tmp_path: Path) -> None:
    onnx_path = _copy_export(exported_model, tmp_path)
    data = bytearray(onnx_path.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="not the one its contract describes") as err:
        load_backend(_cfg(model=str(onnx_path), kind="onnxruntime").backend)
    assert err.value.reason == "onnx_mismatch"


@pytest.mark.parametrize("edit, reason, words", [
    (lambda d: d.update(schema="something/else"), "contract_invalid", "schema"),
    (lambda d: d["frontend"].update(clip_seconds=3.0), "contract_invalid", "fingerprint"),
    (lambda d: d.update(labels=d["labels"][:-1]), "contract_invalid", "labels"),
    (lambda d: d["input"].update(name="x"), "contract_invalid", "input"),
    (lambda d: d.pop("onnx_sha256"), "contract_invalid", "missing field"),
    (lambda d: d.update(onnx_file="other.onnx"), "contract_mismatch", "describes"),
])
def test_wrong_contract_is_refused(exported_model, tmp_path: Path, edit, reason, words) -> None:
    onnx_path = _copy_export(exported_model, tmp_path)
    doc = json.loads(onnx_path.with_suffix(".json").read_text())
    edit(doc)
    onnx_path.with_suffix(".json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=words) as err:
        load_backend(_cfg(model=str(onnx_path), kind="onnxruntime").backend)
    assert err.value.reason == reason


def test_missing_contract_is_refused(exported_model, tmp_path: Path) -> None:
    onnx_path = _copy_export(exported_model, tmp_path)
    onnx_path.with_suffix(".json").unlink()
    with pytest.raises(ArtifactError, match="devrecd export") as err:
        load_backend(_cfg(model=str(onnx_path)).backend)
    assert err.value.reason == "contract_missing"


def test_frontend_differing_from_the_config_is_refused(exported_model) -> None:
    cfg = load_config(None, env={}, overrides={"backend.model": str(exported_model), "frontend.clip_seconds": 2.5})
    with pytest.raises(ArtifactError, match=r"clip_seconds: 2\.5 != 2\.0") as err:
        load_backend(cfg.backend, cfg.frontend)
    assert err.value.reason == "frontend_mismatch"


def test_labels_differing_from_the_config_are_refused(exported_model) -> None:
    labels = list(Contract.load(exported_model.contract).labels)
    ok = load_backend(_cfg(model=str(exported_model), labels=labels, threads=1).backend)
    ok.close()
    for expected, words in ((labels[::-1], "different order"), (labels[:-1] + ["Nokia_x"], "Nokia_x")):
        with pytest.raises(ArtifactError, match=words) as err:
            load_backend(_cfg(model=str(exported_model), labels=expected).backend)
        assert err.value.reason == "labels_mismatch"


def test_explicit_backends_never_fall_back(exported_model, tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:  # this machine: TensorRT named but missing -> error + hint
        with pytest.raises(MissingDependency, match=r"pip install 'devrecd\[gpu\]'"):
            load_backend(_cfg(model=str(exported_model), kind="tensorrt").backend)
    with pytest.raises(ArtifactError) as err:  # torch runs checkpoints, not exports
        load_backend(_cfg(model=str(exported_model), kind="torch").backend)
    assert err.value.reason == "not_checkpoint"
    with pytest.raises(ArtifactError) as err:  # onnxruntime runs exports, not checkpoints
        load_backend(_cfg(model=str(exported_model.checkpoint), kind="onnxruntime").backend)
    assert err.value.reason == "not_onnx"
    with pytest.raises(ArtifactError, match="not found"):
        load_backend(_cfg(model=str(tmp_path / "nope.onnx"), kind="onnxruntime").backend)
    with pytest.raises(ConfigError, match="backend.model"):
        load_backend(_cfg(kind="onnxruntime").backend)
    with pytest.raises(ConfigError):
        load_backend(replace(_cfg().backend, kind="tensorflow"))


# --- batch splitting (shared by every backend with a batch limit) ----------------------------------

def test_batch_slices_cover_every_row_once_within_the_limit() -> None:
    assert list(batch_slices(5, None)) == [slice(0, 5)]
    assert list(batch_slices(64, 64)) == [slice(0, 64)]
    assert [s.stop - s.start for s in batch_slices(100, 64)] == [50, 50]  # balanced, no tiny tail
    assert list(batch_slices(0, 8)) == []
    for n in range(1, 300, 7):
        for limit in (1, 3, 8, 64, 256):
            parts = list(batch_slices(n, limit))
            rows = np.concatenate([np.arange(s.start, s.stop) for s in parts])
            assert np.array_equal(rows, np.arange(n))
            sizes = [s.stop - s.start for s in parts]
            assert max(sizes) <= limit and len(parts) == -(-n // limit) and max(sizes) - min(sizes) <= 1


def test_one_registry_of_backend_classes_names_the_kinds_everywhere() -> None:
    """Each backend class declares its kind; the chooser, the CLI's --backend and the configuration
    accept exactly the registry's kinds (and auto)."""
    import typing

    from devrecd.backends import BACKENDS, KINDS
    from devrecd.cli.app import BackendKind
    from devrecd.config import BackendConfig

    assert KINDS == ("auto", *BACKENDS) and all(cls.name == kind for kind, cls in BACKENDS.items())
    assert [k.value for k in BackendKind] == list(KINDS)
    assert set(typing.get_args(typing.get_type_hints(BackendConfig)["kind"])) == set(KINDS)
    with pytest.raises(ConfigError, match="backend.kind must be one of auto, onnxruntime, tensorrt, torch"):
        BackendConfig(kind="openvino")


def test_a_run_folder_with_only_last_pt_is_served_and_hashed_as_the_file_loaded(exported_model, tmp_path: Path) -> None:
    """A run whose first loss was NaN never writes best.pt: the torch backend loads its last.pt and
    reports that file's sha256 (not a missing best.pt's)."""
    import hashlib

    from devrecd.backends.torch_backend import TorchBackend
    from devrecd.model.checkpoint import resolve_checkpoint_path

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(resolve_checkpoint_path(exported_model.checkpoint), run / "last.pt")
    backend = TorchBackend(run, device="cpu")
    assert backend.model_sha256 == hashlib.sha256((run / "last.pt").read_bytes()).hexdigest()


def test_a_missing_model_file_is_an_artifact_error_that_names_it(tmp_path: Path) -> None:
    """Model files are hashed as artifacts, not as evidence: a missing one is not MissingAudio."""
    from devrecd.fsutil import sha256_artifact

    with pytest.raises(ArtifactError, match="model file not found: .*gone.onnx") as exc:
        sha256_artifact(tmp_path / "gone.onnx")
    assert exc.value.reason == "model_missing"
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    assert sha256_artifact(tmp_path / "m.onnx") == "87e93f89f2be0db364e8be052f79f389e6c2da239831922e24513288af522a43"
