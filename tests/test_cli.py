"""The CLI through typer's CliRunner: help, version, doctor, features on real recordings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from devrecd import __version__
from devrecd.cli import app
from tests.media import encode, speech

runner = CliRunner()


def test_help_and_version():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("doctor", "features", "config"):
        assert cmd in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"devrecd {__version__}"


def test_doctor_is_truthful_about_this_machine():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.strip()}
    assert lines["torch"].startswith("ok")
    assert lines["onnxruntime"].startswith("ok") and "CPUExecutionProvider" in lines["onnxruntime"]
    assert lines["cuda"].startswith("ok" if torch.cuda.is_available() else "no")
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    assert lines["tensorrt"].startswith("ok" if has_trt else "no")
    if not has_trt:
        assert "pip install 'devrecd[gpu]'" in lines["tensorrt"]
    assert lines["decoder:soundfile"].startswith("ok") and "FLAC" in lines["decoder:soundfile"]
    assert "aac" in lines["decoder:pyav"] and "amrnb" in lines["decoder:pyav"]


def test_features_on_every_real_phone_recording(ccnu_dir, tmp_path):
    files = sorted(ccnu_dir.glob("*.wav"))
    assert len(files) == 75
    result = runner.invoke(app, ["features", *map(str, files), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for path in files:
        feats = np.load(tmp_path / f"{path.name}.npy")
        meta = json.loads((tmp_path / f"{path.name}.json").read_text())
        assert feats.ndim == 3 and feats.shape[1:] == (128, 73) and feats.shape[0] >= 4
        assert np.isfinite(feats).all()
        assert meta["shape"] == list(feats.shape)
        assert meta["input"]["sha256"] and meta["frontend"]["clip_seconds"] == 2.0
        assert len(meta["frontend_sha256"]) == 64


def test_features_on_m4a_and_amr_and_bad_files(librispeech_dir, tmp_path):
    x, sr = speech(librispeech_dir)
    m4a = encode(x, sr, tmp_path / "q.m4a", codec="aac", fmt="ipod", out_rate=48000)
    amr = encode(x, sr, tmp_path / "q.amr", codec="libopencore_amrnb", fmt="amr", out_rate=8000)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00")
    out = tmp_path / "out"
    result = runner.invoke(app, ["features", str(m4a), str(amr), str(bad), "--out", str(out), "--hop-seconds", "1.0"])
    assert result.exit_code == 1
    assert "bad.wav" in result.output and "1 of 3 file(s) failed" in result.output
    for name, rate in (("q.m4a", 48000), ("q.amr", 8000)):
        meta = json.loads((out / f"{name}.json").read_text())
        assert meta["input"]["native_rate"] == rate and meta["input"]["resampled"] is True
        assert np.load(out / f"{name}.npy").shape[0] == meta["shape"][0] >= 10  # 15 s at hop 1 s


def test_config_errors_are_one_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[batcher]\nmax_batch = 'x'\n")
    result = runner.invoke(app, ["config", "--config", str(path)])
    assert result.exit_code == 1
    assert result.output.strip() == "error: batcher.max_batch: expected int, got str 'x'"
