"""NAME.ort beside NAME.onnx: written and verified at export, served when it verifies, refused when
it does not (the .onnx is served and the log says why), and exports without it still serve."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from devrecd.audio import sha256_file
from devrecd.backends import load_backend
from devrecd.backends.onnxrt import ort_session
from devrecd.config import load_config
from devrecd.contract import INPUT_NAME, OUTPUT_NAME, Contract, load_for_onnx
from devrecd.errors import ArtifactError
from devrecd.export import ort_path_for, parity_features_path


def _copy_export(exported_model, dst: Path) -> Path:
    """A private copy of the session export (ONNX, ORT, contract, parity features) to damage."""
    onnx_path = exported_model.onnx
    for src in (onnx_path, ort_path_for(onnx_path), onnx_path.with_suffix(".json"), parity_features_path(onnx_path)):
        shutil.copy(src, dst / src.name)
    return dst / onnx_path.name


@pytest.fixture(scope="module")
def onnx_probs(exported_model) -> tuple[np.ndarray, np.ndarray]:
    """(parity features, the .onnx's probabilities on them), computed once."""
    feats = np.load(parity_features_path(exported_model.onnx))
    return feats, ort_session(exported_model.onnx).run([OUTPUT_NAME], {INPUT_NAME: feats})[0]


def _backend(onnx_path: Path):
    cfg = load_config(None, env={}, overrides={"backend.model": str(onnx_path), "backend.kind": "onnxruntime"})
    return load_backend(cfg.backend)


def _fallbacks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "serving the .onnx, not the .ort"]


def test_export_writes_an_ort_that_the_contract_verifies_with_the_onnx_outputs(exported_model, onnx_probs) -> None:
    import onnxruntime

    onnx_path = exported_model.onnx
    contract = load_for_onnx(onnx_path)
    ort_path = ort_path_for(onnx_path)
    assert contract.ort_file() == ort_path.name and ort_path.is_file()
    assert contract.ort["sha256"] == sha256_file(ort_path) and contract.ort["bytes"] == ort_path.stat().st_size
    assert contract.ort["onnxruntime"] == onnxruntime.__version__ == contract.versions["onnxruntime"]
    contract.verify_ort(ort_path)
    assert ort_path.read_bytes()[4:8] == b"ORTM"  # the flatbuffer's file identifier: ORT format, not ONNX
    feats, want = onnx_probs
    got = ort_session(ort_path).run([OUTPUT_NAME], {INPUT_NAME: feats})[0]
    assert np.abs(got - want).max() <= contract.parity["tolerance"]
    assert contract.ort["parity_max_abs_diff"] <= contract.parity["tolerance"]
    backend = _backend(onnx_path)
    try:
        d = backend.describe()
        assert d["served_file"] == ort_path.name and d["served_sha256"] == contract.ort["sha256"]
        assert d["model_sha256"] == contract.onnx_sha256  # the contract is still anchored to the .onnx
        np.testing.assert_allclose(backend.infer(feats), want, atol=contract.parity["tolerance"], rtol=0)
    finally:
        backend.close()


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (_flip_last_byte, "ort_mismatch"),
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "ort_truncated"),
    (lambda p: p.unlink(), "ort_missing"),
])
def test_a_damaged_ort_is_refused_and_the_onnx_served(exported_model, onnx_probs, tmp_path: Path, caplog, damage,
                                                       reason) -> None:
    onnx_path = _copy_export(exported_model, tmp_path)
    damage(ort_path_for(onnx_path))
    feats, want = onnx_probs
    with caplog.at_level(logging.INFO, logger="devrecd.backends"):
        backend = _backend(onnx_path)
    try:
        (warning,) = _fallbacks(caplog)
        assert warning.levelno == logging.WARNING and warning.reason == reason and "paper.ort" in warning.why
        d = backend.describe()
        assert d["served_file"] == onnx_path.name and d["served_sha256"] == sha256_file(onnx_path)
        np.testing.assert_array_equal(backend.infer(feats), want)
    finally:
        backend.close()


def test_an_ort_the_running_onnxruntime_cannot_load_is_refused(exported_model, tmp_path: Path, caplog) -> None:
    """Hash and size right (the contract rewritten to match) but not a model ORT can load: .onnx served."""
    onnx_path = _copy_export(exported_model, tmp_path)
    ort_path = ort_path_for(onnx_path)
    ort_path.write_bytes(b"\0" * 4096)
    doc = json.loads(onnx_path.with_suffix(".json").read_text())
    doc["ort"].update(sha256=sha256_file(ort_path), bytes=4096)
    onnx_path.with_suffix(".json").write_text(json.dumps(doc))
    with caplog.at_level(logging.INFO, logger="devrecd.backends"):
        backend = _backend(onnx_path)
    try:
        (warning,) = _fallbacks(caplog)
        assert warning.reason == "onnx_invalid" and "cannot load" in warning.why
        assert backend.describe()["served_file"] == onnx_path.name
    finally:
        backend.close()


def test_an_export_without_ort_in_its_contract_still_serves(exported_model, tmp_path: Path, caplog) -> None:
    onnx_path = _copy_export(exported_model, tmp_path)
    ort_path_for(onnx_path).unlink()
    contract_path = onnx_path.with_suffix(".json")
    doc = json.loads(contract_path.read_text())
    del doc["ort"]  # as devrecd wrote contracts before .ort files
    contract_path.write_text(json.dumps(doc))
    assert Contract.load(contract_path).ort_file() == ""
    with caplog.at_level(logging.INFO, logger="devrecd.backends"):
        backend = _backend(onnx_path)
    try:
        assert not _fallbacks(caplog)
        (note,) = [r for r in caplog.records if r.getMessage() == "serving the .onnx"]
        assert "names no .ort" in note.why
        assert backend.describe()["served_file"] == onnx_path.name
        feats = np.load(parity_features_path(onnx_path))
        assert backend.infer(feats).shape == (len(feats), 15)
    finally:
        backend.close()


@pytest.mark.parametrize("ort, words", [
    ({"file": "../x.ort", "sha256": "0" * 64, "bytes": 10}, "ort.file"),
    ({"file": "x.onnx", "sha256": "0" * 64, "bytes": 10}, "ort.file"),
    ({"file": "x.ort", "sha256": "abc", "bytes": 10}, "ort.sha256"),
])
def test_contract_refuses_a_malformed_ort_entry(exported_model, ort, words) -> None:
    doc = json.loads(exported_model.contract.read_text())
    doc["ort"] = ort
    with pytest.raises(ArtifactError, match=words.replace(".", r"\.")) as err:
        Contract.from_dict(doc)
    assert err.value.reason == "contract_invalid"


def test_identify_skips_the_warm_up_that_the_daemon_keeps(exported_model, ccnu_dir: Path, monkeypatch) -> None:
    from devrecd.backends.onnxrt import OnnxRuntimeBackend
    from devrecd.pipeline.identify import identify_files
    from devrecd.pipeline.serving import load_serving_backend

    calls: list[int] = []
    real = OnnxRuntimeBackend.warmup
    monkeypatch.setattr(OnnxRuntimeBackend, "warmup", lambda self: (calls.append(1), real(self)))
    cfg = load_config(None, env={}, overrides={"backend.model": str(exported_model.onnx),
                                               "backend.kind": "onnxruntime"})
    (record,) = identify_files(cfg, [ccnu_dir / "xiaomi8se_5.wav"])
    assert record["outcome"] == "judged" and record["device"] and calls == []
    load_serving_backend(cfg).close()  # what the daemon, listen and the cluster job load
    assert calls == [1]


def test_doctor_says_whether_the_ort_is_served_and_why_not(exported_model, tmp_path: Path) -> None:
    """A matching .ort: the ort check passes naming it; a damaged one: the check is a warning (the
    service still runs on the .onnx) that names the reason and the fix."""
    from typer.testing import CliRunner

    from devrecd.cli import app

    def ort_check(onnx_path: Path) -> dict:
        cfg = tmp_path / f"{onnx_path.parent.name}.toml"
        cfg.write_text(f'[backend]\nmodel = "{onnx_path}"\n[watch]\nstate_dir = "{tmp_path / "state"}"\n'
                       '[metrics]\nport = 0\n')
        result = CliRunner().invoke(app, ["doctor", "--config", str(cfg), "--format", "json"])
        assert result.exit_code == 0, result.output  # a warning, not a failure
        return {c["name"]: c for c in json.loads(result.stdout)["checks"]}["ort"]

    good = ort_check(exported_model.onnx)
    assert good["ok"] and good["detail"] == f"serving {ort_path_for(exported_model.onnx).name}" and not good["failed"]
    (tmp_path / "damaged").mkdir()
    onnx_path = _copy_export(exported_model, tmp_path / "damaged")
    _flip_last_byte(ort_path_for(onnx_path))
    bad = ort_check(onnx_path)
    assert not bad["ok"] and not bad["failed"] and not bad["required"]
    assert bad["detail"].startswith(f"serving {onnx_path.name}, not the .ort: ort_mismatch") and "re-export" in bad["hint"]
